"""`graft train`: QLoRA continued pretraining, a plain loop (torchtune style) on `accelerate`.

One process on CPU/GPU, or many under `accelerate launch` / `torchrun` with the configs in
continual/launch/ (DDP, DeepSpeed ZeRO-2/3, FSDP). See docs/continual.md.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, is_complete, read_json, to_jsonable, write_manifest
from continual import arch as A
from continual import data as D
from continual import model as M
from continual.config import TrainConfig
from continual.fingerprint import base_fingerprint
from continual.metrics import MetricsLogger
from continual.state import check_processes, checkpoint_dirs, load_checkpoint, save_checkpoint

ADAPTER_DIR = "adapter"
RUN_CONFIG = "train_config.json"
ADAPTER_INFO = "graft_adapter.json"
# Settings that do not change the loss curve: they may differ when resuming. max_steps and epochs are not among
# them: they set the length of the cosine schedule, so changing them would make the learning rate jump.
_LOGISTICS = {"eval_every", "eval_blocks", "save_every", "keep_checkpoints", "log_every", "progress", "resume"}
_SCHEDULE = {"max_steps", "epochs"}


def lr_lambda(total: int, warmup: int, min_ratio: float):
    """Linear warmup to 1, then cosine to `min_ratio` at `total` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    saved_path = out / RUN_CONFIG
    if not saved_path.is_file():
        return
    saved = read_json(saved_path)
    now = to_jsonable(cfg)
    diff = sorted(k for k in set(saved) | set(now) if k not in _LOGISTICS and saved.get(k) != now.get(k))
    schedule = [k for k in diff if k in _SCHEDULE]
    if schedule:
        was = ", ".join(f"{k} = {saved.get(k)!r}" for k in schedule)
        now_s = ", ".join(f"{k} = {now.get(k)!r}" for k in schedule)
        raise input_error(out / RUN_CONFIG, f"the run was started with {was}, which fixes the length of its cosine "
                                            f"learning-rate schedule; resuming with {now_s} would make the "
                                            "learning rate jump",
                          f"resume with {was} in the train config, or start a new run in another `out`")
    if diff:
        raise input_error(out, f"holds a run started with other settings ({', '.join(diff)} differ)",
                          "resume with the same settings, or choose a new `out`")


def _batch(ds, idx, device):
    import torch

    return torch.tensor(ds[[int(i) for i in idx]][D.COLUMN], dtype=torch.long, device=device)


def evaluate(model, dev_ds, n_blocks: int, micro_batch_size: int, accelerator, autocast) -> tuple[float, float]:
    """Summed next-token cross-entropy (nats) and the number of predicted tokens, over all ranks.

    Every rank runs the same number of forward passes (under ZeRO-3 and FSDP each forward is a collective):
    a rank whose share of the blocks runs out forwards block 0 again and leaves it out of the sums.
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    nats = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for k in range(math.ceil(n_blocks / (world * micro_batch_size))):
            lo = (k * world + rank) * micro_batch_size
            idx = range(lo, min(lo + micro_batch_size, n_blocks))
            batch = _batch(dev_ds, idx if len(idx) else [0], accelerator.device)
            with autocast():
                logits = model(input_ids=batch, output_router_logits=False, use_cache=False).logits
            if len(idx):
                nats += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                        batch[:, 1:].reshape(-1), reduction="sum").double()
                count += batch[:, 1:].numel()
    nats, count = accelerator.reduce(nats, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return float(nats), float(count)


def _zero_contribution(params):
    """0 x the sum of every trainable parameter: adds nothing to the loss, but gives each parameter a gradient
    (zero where the step did not use it). DDP's reducer then sees a gradient for experts no token was routed to
    and for new-row deltas of batches without new ids, and AdamW steps every parameter each step, as under
    DeepSpeed's flat buffers. Cheaper than find_unused_parameters: benchmarks/bench_unused_params.py.

    Built *before* the forward: autograd runs its backward last, so every parameter's gradient is complete at
    that point and reaches the engine in the order of `params` on every rank, whichever experts the rank's
    tokens were routed to. DeepSpeed ZeRO-2 reduces gradients in the order they arrive and pairs up the wrong
    ones across ranks otherwise (measured: expert LoRA weights off by 100% after 4 steps; without the term at
    all, a rank aborts in step 2)."""
    return sum(p.sum() for p in params) * 0.0


@contextlib.contextmanager
def _whole_params_for_peft(zero3: bool):
    """Under ZeRO-3 peft gathers the embedding rows that new-rows trains from partitioned weights, on CUDA only
    ("right now, only CUDA is implemented"). Our weights are whole at that point (a 4-bit model loads without
    zero.Init; DeepSpeed partitions it in prepare), so peft is told ZeRO-3 is off while it wraps the model."""
    if not zero3:
        yield
        return
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def _fsdp_units(accelerator, model, compute_dtype) -> None:
    """FSDP flattens each unit into one dtype, but the frozen 4-bit layers are stored in bf16 and the trained
    weights in float32 (for AdamW). peft's wrap policy gives every trainable leaf (LoRA A/B, the embedding copies
    of embeddings = "full") a unit of its own next to the decoder-layer units, and FSDP's mixed precision
    computes in the compute dtype while the float32 weights stay the optimizer's, as transformers' Trainer sets
    up FSDP-QLoRA. Buffers (rotary inv_freq) stay float32."""
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    plugin.set_mixed_precision(compute_dtype, buffer_autocast=True, override=True)


def save_adapter_weights(model, folder: Path, state_dict=None) -> None:
    """The peft adapter files of `model` (a PeftModel, maybe holding FSDP units) into `folder`.

    peft 0.21.2 finds an adapter's weights by module names and strips `_fsdp_wrapped_module.` only where a name
    starts with it; under FSDP's per-layer units it sits in the middle (`layers.0._fsdp_wrapped_module.self_attn`),
    and save_pretrained silently left out every LoRA weight (seen on an H200: the adapter held only the embedding
    copies). So while it saves, peft sees the plain module names, which the gathered `state_dict` uses too."""
    plain = model.named_modules

    def named_modules(*args, **kwargs):
        for name, module in plain(*args, **kwargs):
            yield name.replace("_fsdp_wrapped_module.", ""), module

    model.named_modules = named_modules  # this instance only, for the duration of the save
    try:
        # Embedding weights are saved through modules_to_save / trainable_token_indices only; "auto" would add a
        # full copy of both matrices in new-rows mode, defeating its purpose.
        model.save_pretrained(str(folder), save_embedding_layers=False, state_dict=state_dict)
    finally:
        del model.named_modules


def _fsdp_trained_weights(model, raw_model) -> dict:
    """The trained weights, gathered whole (every process takes part). FSDP's own full state dict cannot be used:
    it expects the frozen `original_module` weight that peft's modules_to_save leaves beside the trained copy
    (measured on an H200: AssertionError "FSDP assumes ...embed_tokens.original_module.weight is in the
    state_dict")."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().cpu().clone()
                for n, p in raw_model.named_parameters() if p.requires_grad}


def _make_accelerator(cfg: TrainConfig, launch: dict | None):
    """The Accelerator for this process. DeepSpeed gets a config generated from the train config; on a machine
    without GPUs it runs on DeepSpeed's CPU accelerator (gloo). FSDP needs GPUs (accelerate enables it only for
    GPU-type devices): refused on CPU rather than silently run as DDP."""
    import os

    import torch
    from accelerate import Accelerator, DeepSpeedPlugin, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    from continual import launcher

    cuda = torch.cuda.is_available()
    kind = launch["distributed_type"] if launch else None
    if kind == "FSDP" and not cuda:
        raise GraftError("the launch config asks for FSDP, but this machine has no GPU: accelerate 1.15 enables FSDP "
                         "only on GPU-type devices and would silently run plain DDP on CPU. Fix: run FSDP on GPUs, or "
                         "use --launch-config ddp or deepspeed-zero2/deepspeed-zero3 (these run on CPU)")
    if kind == "DEEPSPEED":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        conf = launcher.deepspeed_config(cfg, launch, world=world, cuda=cuda)
        # The YAML's DeepSpeed fields are already folded into `conf` (and checked against the train config);
        # accelerate refuses a config dict while it still lists them as set elsewhere.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=conf)
        if not cuda:
            # accelerate's cpu=True would drop DeepSpeed for DDP; DeepSpeed's own CPU accelerator uses gloo.
            PartialState(cpu=False, backend="gloo")
        return Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=cfg.grad_accum)
    return Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def train(cfg: TrainConfig) -> Path:
    """Train a QLoRA adapter per `cfg`; returns OUT (with OUT/adapter). Re-running resumes.

    The parts, in the order they run (torchtune's recipe layout): `_Run.build` (inputs, engine, model, optimizer),
    `_Run.resume`, `_Run.fit` (`_Run.step` and `_Run.evaluate` per step, checkpoints) and `_Run.save`."""
    cfg.validate()
    started = time.time()
    out = Path(cfg.out)
    if cfg.resume and is_complete(out):
        print(f"{out}: already complete (manifest.json). Delete it or choose another out to train again.")
        return out
    run = _Run(cfg, started)
    run.build()
    run.resume()
    run.fit()
    run.save()
    return out


class _Run:
    """One training run: what its parts share. Attributes are set by `build` (in its order) and `resume`."""

    def __init__(self, cfg: TrainConfig, started: float):
        self.cfg, self.started, self.out = cfg, started, Path(cfg.out)
        self.step_n, self.micro_pos, self.tokens = 0, 0, 0
        self.last_dev: dict[str, float] = {}

    # ---- build ----
    def build(self) -> None:
        """Everything before the first step; inputs and checkpoints are checked before the model loads."""
        self._build_accelerator()
        self._build_inputs()
        self._build_engine()
        self._check_out()
        self._build_model()
        self._build_optimizer()

    def _build_accelerator(self) -> None:
        import torch

        from continual import launcher

        cfg = self.cfg
        launch = launcher.launch_from_env()
        if launch:  # before anything heavy: the launch YAML must agree with the train config
            launcher.check_train_config_for(launch, cfg, launcher.ENV_WHERE, cuda=torch.cuda.is_available())
        self.accelerator = accelerator = _make_accelerator(cfg, launch)
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.main = accelerator.is_main_process

    def _build_inputs(self) -> None:
        """Tokenizer, train/dev blocks and the schedule length, checked before anything heavy."""
        cfg = self.cfg
        model_cfg = M.read_model_config(cfg.model)
        self.vocab_size = vocab_size = int(model_cfg["vocab_size"])
        self.tok_path = cfg.tokenizer or cfg.model
        self.tokenizer = M.load_tokenizer(self.tok_path)
        M.check_tokenizer_matches(self.tokenizer, vocab_size, self.tok_path, cfg.model)
        # Resolved once, before the model loads: auto with an architecture outside continual/arch.py fails here.
        self.targets = M.lora_targets(cfg.model, cfg.target_modules)
        self.train_ds = train_ds = D.load_split(cfg.train_data, "train")
        self.dev_src = dev_src = cfg.dev_data or cfg.train_data
        self.dev_ds = dev_ds = D.load_split(dev_src, "dev")
        self.seq_len = D.block_length(train_ds, cfg.train_data, cfg.seq_len)
        D.block_length(dev_ds, f"{dev_src} (dev split)", self.seq_len)
        # recorded in the manifest; the eval stage scores documents alike
        self.bos = D.same_bos(cfg.train_data, dev_src)
        for ds, where in ((train_ds, cfg.train_data), (dev_ds, f"{dev_src} (dev split)")):
            top = D.max_token_id(ds)
            if top >= vocab_size:
                raise input_error(where, f"holds token id {top} but the model has {vocab_size} embedding rows",
                                  "tokenize the corpus with the tokenizer of this model")
        self.new_rows_start = (M.find_new_rows_start(cfg.model, len(self.tokenizer), cfg.new_rows_start)
                               if cfg.embeddings == "new-rows" else None)
        per_epoch = len(train_ds) // (cfg.micro_batch_size * self.world) // cfg.grad_accum
        if per_epoch == 0:
            raise input_error(cfg.train_data, f"has {len(train_ds)} blocks, fewer than one optimizer step needs "
                                              f"({cfg.micro_batch_size * self.world * cfg.grad_accum})",
                              "add data or lower micro_batch_size/grad_accum")
        self.total_steps = cfg.max_steps or per_epoch * cfg.epochs

    def _build_engine(self) -> None:
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        self.fsdp = fsdp = accelerator.distributed_type == DistributedType.FSDP
        ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        self.zero3 = ds_plugin is not None and getattr(ds_plugin, "zero_stage", 0) == 3
        # Engines whose processes each hold only a shard of the optimizer state (and maybe the parameters).
        self.sharded = fsdp or accelerator.distributed_type == DistributedType.DEEPSPEED
        self.engine = ("fsdp" if fsdp else f"deepspeed-zero{ds_plugin.zero_stage}" if ds_plugin is not None
                       else "ddp" if self.world > 1 else "single")

    def _check_out(self) -> None:
        """OUT's checkpoints must belong to this run (settings, process count), checked before the model loads."""
        cfg, out = self.cfg, self.out
        self.ckpts = ckpts = checkpoint_dirs(out)
        if ckpts and not cfg.resume:
            raise input_error(out, "already holds checkpoints of a run", "set resume = true to continue it, or "
                                                                         "choose another out")
        if ckpts:
            _check_resume_config(out, cfg)
            check_processes(ckpts[-1], self.world, self.engine)  # before the model loads
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / RUN_CONFIG, cfg)

    def _build_model(self) -> None:
        """The 4-bit base with its adapters (and the MoE router's aux loss), ready for the engine."""
        import torch

        cfg, fsdp, zero3 = self.cfg, self.fsdp, self.zero3
        self.compute_dtype = compute_dtype = M.resolve_compute_dtype(cfg.compute_dtype)
        torch.manual_seed(cfg.seed)
        if (fsdp or zero3) and cfg.quant_storage != "bfloat16":
            raise GraftError(f"{'FSDP' if fsdp else 'DeepSpeed ZeRO-3'} shards only float tensors. Fix: set "
                             'quant_storage = "bfloat16" in the train config')
        # Sharded engines place (and shard) the weights themselves; otherwise each process loads onto its GPU.
        device_map = {"": self.device} if self.device.type == "cuda" and not (fsdp or zero3) else None
        model = M.load_base_4bit(cfg.model, compute_dtype, cfg.quant_storage, device_map=device_map)
        M.check_target_modules(model, self.targets, cfg.model)
        has_aux = A.has_aux_loss(model.config)  # Mixtral, Qwen2/3-MoE (not DeepSeek's, nor dense models)
        use_aux = bool(has_aux and cfg.router_aux_loss)
        if has_aux:
            model.config.output_router_logits = use_aux
            if cfg.router_aux_loss_coef is not None:
                model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
                model.router_aux_loss_coef = cfg.router_aux_loss_coef
        aux_coef = float(getattr(model, "router_aux_loss_coef", 0.0)) if use_aux else 0.0
        self.use_aux, self.aux_coef = use_aux, aux_coef
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with _whole_params_for_peft(zero3):
            model = M.add_adapters(model, cfg, len(self.tokenizer), self.new_rows_start, self.targets)
        if fsdp:
            _fsdp_units(self.accelerator, model, compute_dtype)
        self.model = model

    def _build_optimizer(self) -> None:
        """AdamW (embeddings in a group of their own) and the schedule; the engine wraps model and optimizer."""
        import torch

        cfg, model = self.cfg, self.model
        emb_names = M.embedding_param_names(model)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        emb_lr = cfg.embedding_lr if cfg.embedding_lr is not None else cfg.learning_rate / 2
        groups = [{"params": [p for n, p in trainable if n not in emb_names], "lr": cfg.learning_rate},
                  {"params": [p for n, p in trainable if n in emb_names], "lr": emb_lr}]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        warmup = max(1, round(cfg.warmup_ratio * self.total_steps)) if cfg.warmup_ratio > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, warmup, cfg.min_lr_ratio))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # A parameter without a gradient in a step (an expert no token was routed to, new-row deltas of a batch
        # without new ids) must not stall DDP's gradient reduction, and every engine must step it alike: DeepSpeed
        # and FSDP keep flat buffers, where it gets a zero gradient (AdamW then decays its moments and counts the
        # step). So it gets an explicit zero gradient everywhere, one process included. ZeRO-3 (each MoE block one
        # leaf per the launch YAML) and FSDP hold parameters sharded outside forward and zero-fill their flat
        # gradients by themselves.
        self.train_params = [p for _, p in trainable]
        self.every_param_used = not (self.zero3 or self.fsdp)
        self.raw_model = self.accelerator.unwrap_model(self.model)

    # ---- resume ----
    def resume(self) -> None:
        """Step, data position and token count (and the weights, optimizer, schedule) from the last checkpoint."""
        if not self.ckpts:
            return
        state = load_checkpoint(self.ckpts[-1], self.raw_model, self.optimizer, self.scheduler, self.rank, self.world)
        self.step_n, self.micro_pos, self.tokens = state["step"], state["micro_pos"], state["tokens"]
        if self.main:
            print(f"resuming from {self.ckpts[-1]} (step {self.step_n} of {self.total_steps})")

    # ---- the loop: step, evaluate, checkpoints ----
    def fit(self) -> None:
        """Steps up to `total_steps`, with dev evaluations, metrics and checkpoints."""
        import functools

        import torch
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.autocast = (functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
                         if self.compute_dtype == torch.bfloat16 else contextlib.nullcontext)
        self.n_dev = len(self.dev_ds) if not cfg.eval_blocks else min(cfg.eval_blocks, len(self.dev_ds))
        self.dev_bytes = D.utf8_bytes_of_blocks(self.dev_ds, self.tokenizer, self.n_dev)
        self.logger = MetricsLogger(self.out, self.main, self.step_n)
        if self.step_n == 0 and cfg.eval_every:
            self.logger.log(0, tokens=0, **self.evaluate(), elapsed_s=round(time.time() - self.started, 3))

        self.batches = D.micro_batches(len(self.train_ds), cfg.micro_batch_size, cfg.seed, self.micro_pos,
                                       self.rank, self.world)
        self.tokens_per_step = cfg.micro_batch_size * self.seq_len * cfg.grad_accum * self.world
        bar = tqdm(total=self.total_steps, initial=self.step_n, disable=not (cfg.progress and self.main),
                   unit="step", dynamic_ncols=True)
        self.model.train()
        while self.step_n < self.total_steps:
            t0 = time.perf_counter()
            loss, aux, grad_norm = self.step()
            tps = self.tokens_per_step / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}",
                            **({k: f"{v:.4f}" for k, v in self.last_dev.items()}))
            self._after_step(loss, aux, grad_norm, tps)
        bar.close()
        self.logger.close()

    def step(self) -> tuple[float, float, object]:
        """One optimizer step over `grad_accum` micro-batches: (mean loss, mean aux loss, grad norm or None)."""
        import torch

        cfg, accelerator, model, optimizer = self.cfg, self.accelerator, self.model, self.optimizer
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for _ in range(cfg.grad_accum):
            micro_pos, idx = next(self.batches)
            self.micro_pos = micro_pos + 1
            batch = _batch(self.train_ds, idx, self.device)
            with accelerator.accumulate(model):
                zero = _zero_contribution(self.train_params) if self.every_param_used else None  # before the forward
                with self.autocast():
                    res = model(input_ids=batch, labels=batch, output_router_logits=self.use_aux, use_cache=False)
                accelerator.backward(res.loss if zero is None else res.loss + zero)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += res.loss.detach().float()
            if self.use_aux and res.aux_loss is not None:
                aux_sum += res.aux_loss.detach().float()
        self.scheduler.step()
        self.step_n += 1
        self.tokens += self.tokens_per_step
        loss = float(accelerator.reduce(loss_sum, "mean")) / cfg.grad_accum
        aux = float(accelerator.reduce(aux_sum, "mean")) / cfg.grad_accum
        if not math.isfinite(loss):
            raise GraftError(f"the loss became {loss} at step {self.step_n}. Fix: lower learning_rate/embedding_lr, "
                             "or resume from an earlier checkpoint")
        return loss, aux, grad_norm

    def evaluate(self) -> dict[str, float]:
        """Dev loss (nats per token) and bits per UTF-8 byte of the first `n_dev` dev blocks."""
        nats, count = evaluate(self.model, self.dev_ds, self.n_dev, self.cfg.micro_batch_size, self.accelerator,
                               self.autocast)
        return {"dev_loss": nats / count, "dev_bpb": nats / math.log(2) / max(1, self.dev_bytes)}

    def _after_step(self, loss: float, aux: float, grad_norm, tps: float) -> None:
        """Dev evaluation, the metrics row and a checkpoint, each when this step is due for it."""
        cfg, step, last = self.cfg, self.step_n, self.step_n == self.total_steps
        dev = self.evaluate() if (cfg.eval_every and step % cfg.eval_every == 0) or last else {}
        if dev:
            self.last_dev = dev
        if step % cfg.log_every == 0 or dev or last:
            lrs = self.scheduler.get_last_lr()
            self.logger.log(step, tokens=self.tokens, lr=lrs[0], embedding_lr=lrs[1] if len(lrs) > 1 else None,
                            loss=loss, ce_loss=loss - self.aux_coef * aux, aux_loss=aux if self.use_aux else None,
                            grad_norm=None if grad_norm is None else float(grad_norm), tokens_per_s=round(tps, 1),
                            **dev, elapsed_s=round(time.time() - self.started, 3))
        if (cfg.save_every and step % cfg.save_every == 0) and not last:
            save_checkpoint(self.out, step, self.raw_model, self.optimizer, self.scheduler,
                            {"micro_pos": self.micro_pos, "tokens": self.tokens, "engine": self.engine},
                            cfg.keep_checkpoints, self.rank, self.world,
                            barrier=self.accelerator.wait_for_everyone, sharded=self.sharded)

    # ---- save ----
    def save(self) -> None:
        """OUT/adapter and OUT/manifest.json (main process), after every process has finished its steps."""
        cfg, accelerator = self.cfg, self.accelerator
        accelerator.wait_for_everyone()
        # Under ZeRO-3/FSDP the parameters are sharded: gather a full state dict (every process takes part).
        full_state = (_fsdp_trained_weights(self.model, self.raw_model) if self.fsdp else
                      accelerator.get_state_dict(self.model) if self.zero3 else None)
        if self.main:
            _save_adapter(self.out, self.raw_model, self.tokenizer, cfg, self.vocab_size, self.new_rows_start,
                          self.targets, full_state)
            write_manifest(self.out, stage="continual.train", config=cfg,
                           inputs={"model": cfg.model, "tokenizer": self.tok_path, "train_data": cfg.train_data,
                                   "dev_data": self.dev_src},
                           counts={"steps": self.step_n, "tokens": self.tokens, "train_blocks": len(self.train_ds),
                                   "dev_blocks": self.n_dev, "dev_bytes": self.dev_bytes, "seq_len": self.seq_len,
                                   "processes": self.world, **M.count_4bit_params(self.raw_model)},
                           started=self.started, final_dev=self.last_dev, adapter=ADAPTER_DIR, bos=self.bos)
        accelerator.wait_for_everyone()


def _save_adapter(out: Path, model, tokenizer, cfg: TrainConfig, vocab_size: int, new_rows_start: int | None,
                  targets: list[str], state_dict=None) -> None:
    """OUT/adapter: peft adapter (+ trained embeddings), tokenizer, and what `graft merge` checks."""
    with atomic_path(out / ADAPTER_DIR) as tmp:
        save_adapter_weights(model, tmp, state_dict)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / ADAPTER_INFO, {
            "base": str(Path(cfg.model).resolve()), "base_fingerprint": base_fingerprint(cfg.model),
            "vocab_size": vocab_size, "embeddings": cfg.embeddings, "new_rows_start": new_rows_start,
            "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "target_modules": targets})
