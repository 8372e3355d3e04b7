"""What the trainer knows about each model architecture, in one table keyed by config.json's `model_type`.

Per architecture: the LoRA targets of `target_modules = "auto"` (attention plus every expert, shared-expert
and dense MLP Linear), the Linear layers kept out of 4-bit (routers and shared-expert gates; lm_head always),
and whether it has a router load-balancing loss (its config has `output_router_logits`). Names are checked
against the checkpoint's own tensors (safetensors headers, no weights read) before the model loads: an
architecture outside the table, or a target list that matches nothing, is an error listing the model's
linear layers. Adding an architecture: one `Arch` row here plus a tiny model in tests/test_continual_archs.py
(README, "Supported architectures").

bitsandbytes (transformers 4.57.6 `_replace_with_bnb_linear`) keeps a Linear out of 4-bit when its own name
equals a skip name, or its dotted path contains `skip + "."` or equals it. So the skip names are exact
module names: "gate" keeps Qwen2-MoE's router `mlp.gate` but not `mlp.shared_expert_gate` (listed on its
own) nor `mlp.shared_expert.gate_proj` (an expert weight, 4-bit on purpose).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import input_error

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GLU_MLP = ("gate_proj", "up_proj", "down_proj")
# Multi-head latent attention (DeepSeek-V2/V3): q_proj when q_lora_rank is unset, else q_a_proj + q_b_proj.
MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLA_EITHER = ("q_proj", "q_a_proj", "q_b_proj")
OUTPUT = "lm_head"  # never 4-bit: the output layer (trainable in most runs, precision-critical)


@dataclass(frozen=True)
class Arch:
    label: str                  # as the README's table names it
    kind: str                   # dense | MoE | MoE + shared experts
    targets: tuple[str, ...]    # LoRA targets of target_modules = "auto"
    skip_4bit: tuple[str, ...]  # Linear names kept out of 4-bit besides lm_head (routers, shared-expert gates)
    aux_loss: bool              # router load-balancing loss (config.output_router_logits)
    optional: tuple[str, ...] = ()  # targets a variant of the architecture may lack


ARCHS: dict[str, Arch] = {
    "mixtral": Arch("Mixtral", "MoE", ATTENTION + ("w1", "w2", "w3"), ("gate",), True),
    "qwen2_moe": Arch("Qwen2-MoE (Qwen1.5-MoE)", "MoE + shared experts", ATTENTION + GLU_MLP,
                      ("gate", "shared_expert_gate"), True),
    "qwen3_moe": Arch("Qwen3-MoE", "MoE", ATTENTION + GLU_MLP, ("gate",), True),
    # The router `gate` is a plain Parameter here (DeepseekV2MoEGate / DeepseekV3TopkRouter), never quantized;
    # listed so a future Linear router stays out too. No auxiliary loss in transformers' implementation.
    "deepseek_v2": Arch("DeepSeek-V2", "MoE + shared experts", MLA + GLU_MLP, ("gate",), False, MLA_EITHER),
    "deepseek_v3": Arch("DeepSeek-V3", "MoE + shared experts", MLA + GLU_MLP, ("gate",), False, MLA_EITHER),
    "llama": Arch("Llama", "dense", ATTENTION + GLU_MLP, (), False),
    "mistral": Arch("Mistral (Mistral-Nemo)", "dense", ATTENTION + GLU_MLP, (), False),
}
# Kept out of 4-bit for an architecture outside the table (explicit target_modules): every known router name.
ALL_SKIPS = tuple(sorted({s for a in ARCHS.values() for s in a.skip_4bit}))


def model_type(config: dict) -> str:
    return str(config.get("model_type") or "")


# config.json keys that hold the number of routed experts, across MoE families
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def router_names(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """For an MoE outside the table: the names (last component) of the Linear weights shaped like a router,
    hidden -> one output per routed expert, or a per-token gate (hidden -> 1). A name counts only when every
    weight with that name has such a shape, never for a projection name of the table (k_proj is (n, hidden) when
    n equals the key/value width), and never when the expert count equals hidden_size."""
    n = next((config[k] for k in EXPERT_KEYS if isinstance(config.get(k), int) and config[k] > 1), None)
    hidden = config.get("hidden_size")
    if n is None or n == hidden:  # no experts, or a projection could have a router's shape: do not guess
        return []
    known = set(ATTENTION) | set(MLA) | set(GLU_MLP) | {"w1", "w2", "w3", OUTPUT}  # never routers, whatever shape
    return sorted(name for name, got in linear_shapes(shapes).items()
                  if name not in known and got <= {(n, hidden), (1, hidden)})


def skip_modules(config: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """llm_int8_skip_modules for a model with this config.json: its routers/gates and lm_head. Outside the table:
    every router name the table knows, plus the router-shaped Linears of `shapes` (the checkpoint's tensors)."""
    arch = ARCHS.get(model_type(config))
    if arch:
        return [*arch.skip_4bit, OUTPUT]
    return [*sorted(set(ALL_SKIPS) | set(router_names(config, shapes or {}))), OUTPUT]


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers (no tensor data is read)."""
    from common.checkpoint import open_checkpoint

    return {k: tuple(info.shape) for h in open_checkpoint(model_dir).headers.values() for k, info in h.tensors.items()}


def has_aux_loss(config) -> bool:
    """The architecture has a router load-balancing loss that transformers computes (output_router_logits)."""
    return hasattr(config, "output_router_logits")


def linear_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, set[tuple[int, ...]]]:
    """{name (last component): its shapes} of the Linear-like weights among a checkpoint's tensors: every 2-D
    `*.weight` except embed_tokens."""
    out: dict[str, set[tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        if len(shape) == 2 and parts[-1] == "weight" and len(parts) >= 2 and parts[-2] != "embed_tokens":
            out.setdefault(parts[-2], set()).add(tuple(shape))
    return out


def linear_names(model_dir: str | Path) -> list[str]:
    """Names of the model's Linear-like weights, read from the safetensors headers (linear_shapes). Cheap: no
    tensor data is read and no model is built."""
    return sorted(linear_shapes(checkpoint_shapes(model_dir)))


def resolve_targets(model_dir: str | Path, config: dict, targets: list[str]) -> list[str]:
    """The LoRA target names for this model: the table's for ["auto"], else `targets` (checked later against the
    loaded model's Linear layers by continual.model.check_target_modules)."""
    from continual.config import AUTO_TARGETS

    if list(targets) != [AUTO_TARGETS]:
        return list(targets)
    have = linear_names(model_dir)
    mt = model_type(config)
    arch = ARCHS.get(mt)
    fix = ("set target_modules to the attention and MLP/expert layers among them (routers and gates stay "
           "frozen), e.g. target_modules = [\"q_proj\", \"v_proj\", ...] in the train config")
    if arch is None:
        raise input_error(model_dir, f"model_type {mt!r} is not in graft's architecture table "
                                     f"({', '.join(ARCHS)}), so target_modules = auto cannot pick its LoRA targets; "
                                     f"its linear layers are: {', '.join(have)}", fix)
    chosen = [t for t in arch.targets if t in have]
    missing = [t for t in arch.targets if t not in have and t not in arch.optional]
    # Every Linear must be a target, a router kept in 16-bit, or lm_head: else the table does not fit this model.
    uncovered = [n for n in have if n not in arch.targets and n not in arch.skip_4bit and n != OUTPUT]
    if missing or uncovered or not chosen:
        what = (f"lacks {', '.join(missing)}" if missing else "") + (" and " if missing and uncovered else "") + \
               (f"has linear layers the table does not know ({', '.join(uncovered)})" if uncovered else "")
        raise input_error(model_dir, f"this {arch.label} checkpoint {what or 'matches no target'}, so target_modules "
                                     f"= auto does not fit it; its linear layers are: {', '.join(have)}", fix)
    return chosen
