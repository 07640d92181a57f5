"""The distributed engine: what `accelerate launch` was asked for (DDP, FSDP2, DeepSpeed ZeRO; its config and flags
reach us as environment variables), engaged for real on GPUs and on CPU processes over gloo, or refused before
training. Every workaround for an accelerate limitation lives here, with the accelerate versions that need it.
"""

import os
from pathlib import Path

from .errors import EngineError, InputError

ROOT = Path(__file__).resolve().parents[1]


def set_process_environment():
    """Before accelerate is imported: DeepSpeed (which accelerate imports when installed) would pick its CPU
    accelerator on a machine without GPUs anyway, with a warning."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def requested_engine() -> str:
    """'deepspeed', 'fsdp' or 'ddp' (plain data parallel, or one process), as the launcher's environment says."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


# accelerate 1.6-1.16 (checked up to 1.16.0): `accelerate launch --cpu --num_processes N` (N > 1) without
# --mpirun_hostfile starts ONE process, with the MASTER_ADDR/MASTER_PORT of a multi-process launch but no WORLD_SIZE
# (its simple launcher; the multi-process CPU path is mpirun's). That one process would train alone, silently.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def check_process_count(environ=None):
    """Stop when accelerate's simple CPU launcher was asked for several processes (or machines) but started this
    one alone: its environment names a rendezvous (MASTER_ADDR) but no process group size."""
    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_CPU", "false").lower() not in ("true", "1") or "MASTER_ADDR" not in environ:
        return
    if any(name in environ for name in MPI_SIZE_VARIABLES):
        return
    raise EngineError(
        "`accelerate launch --cpu` was asked for several processes but started 1 (MASTER_ADDR is set, no "
        "WORLD_SIZE): its --cpu multi-process path needs MPI (--mpirun_hostfile). On CPUs start the processes "
        "through torchrun's path, which trains over gloo: accelerate launch --multi_gpu --num_processes N "
        "train.py ...; or unset MASTER_ADDR for a single process")


def deepspeed_plugin(per_device_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float,
                     world_size: int, on_cpu: bool):
    """accelerate's DeepSpeedPlugin from the launch config, with the batch, accumulation and clipping values that
    accelerate would fill from a dataloader (train.py prepares none) set from our flags."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise EngineError(f"the launch config asks for DeepSpeed but it cannot be imported ({error}): "
                           "pip install deepspeed") from error
    from accelerate.utils import DeepSpeedPlugin

    if on_cpu:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise EngineError(f"DeepSpeed on CPU processes needs its CPU accelerator, but it selected "
                               f"{get_accelerator().device_name()!r}: set DS_ACCELERATOR=cpu")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and not os.path.isfile(path) and (ROOT / path).is_file():
        path = str(ROOT / path)  # the shipped configs name their JSON relative to the repository
    plugin = DeepSpeedPlugin(hf_ds_config=path) if path and path != "none" else DeepSpeedPlugin()
    config = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": ("--per_device_train_batch_size", per_device_batch_size),
              "gradient_accumulation_steps": ("--gradient_accumulation_steps", gradient_accumulation_steps),
              "train_batch_size": ("--per_device_train_batch_size x --gradient_accumulation_steps x processes",
                                   per_device_batch_size * gradient_accumulation_steps * world_size),
              "gradient_clipping": ("--max_grad_norm", max_grad_norm)}
    for key, (flag, value) in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise InputError(f"DeepSpeed config {path or '(from accelerate launch flags)'}: {key} is {config[key]} "
                             f"but {flag} gives {value}; set it to \"auto\" or to the same value")
        config[key] = value
    return plugin  # AcceleratorState fills mixed precision and hands transformers the config for zero.Init


def accelerator_options(*, per_device_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float,
                        on_cpu: bool) -> dict:
    """Accelerator arguments that engage the requested engine. accelerate builds a process group on CPU only with
    cpu=True (then it drops FSDP and DeepSpeed), so each engine gets its own route on a machine without GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_process_count()
    engine = requested_engine()
    if engine == "deepspeed":
        plugin = deepspeed_plugin(per_device_batch_size, gradient_accumulation_steps, max_grad_norm, world_size,
                                  on_cpu)
        options = {"deepspeed_plugin": plugin}
        if on_cpu:
            # cpu=True would turn DeepSpeed off; DeepSpeed's own process group over gloo keeps it on.
            from accelerate.utils import InitProcessGroupKwargs

            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return options
    if engine == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        if on_cpu and plugin.fsdp_version != 2:
            raise EngineError(f"FSDP on CPU processes runs as FSDP2 (torch's fully_shard over gloo); the launch "
                               f"config has fsdp_version {plugin.fsdp_version}: set fsdp_version: 2")
        if on_cpu and world_size < 2:
            raise EngineError("FSDP on CPU needs 2 or more processes (--num_processes 2): one CPU process gets no "
                               "process group from accelerate, and has nothing to shard with")
        return {"fsdp_plugin": plugin, "cpu": on_cpu}
    # Several processes started by torchrun / `accelerate launch --multi_gpu` on a machine without a GPU: DDP over
    # gloo on the CPU (accelerate's own `--cpu` multi-process path needs MPI).
    return {"cpu": world_size > 1 and on_cpu}


def engage_fsdp_on_cpu(accelerator, plugin) -> bool:
    """accelerate 1.6-1.16 (checked up to 1.16.0) engages FSDP only for accelerator devices (AcceleratorState's
    MULTI_GPU, MULTI_XPU, ... list), yet torch's FSDP2 runs over gloo on CPU: make the two assignments
    AcceleratorState makes there. Returns whether it had to (the engine record says so, and a test fails once
    accelerate engages FSDP on CPU itself, so that this can go)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return False
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() re-reads it from here
    return True


def make_accelerator(*, mixed_precision: str, gradient_accumulation_steps: int, per_device_batch_size: int,
                     max_grad_norm: float, project_dir, report_to: str = "none", torch_compile: bool = False):
    """The Accelerator running the engine `accelerate launch` asked for (its config and flags reach us as
    environment variables), on GPUs or CPU processes; refuses, before training, when it cannot be had."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    if mixed_precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed_precision = None  # what `accelerate launch` / its config file chose
        elif not on_cpu:
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"
    options = accelerator_options(per_device_batch_size=per_device_batch_size, max_grad_norm=max_grad_norm,
                                  gradient_accumulation_steps=gradient_accumulation_steps, on_cpu=on_cpu)
    accelerator = Accelerator(
        **options,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "runs")),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
        dynamo_backend="inductor" if torch_compile else None,
    )
    accelerator.fsdp_on_cpu_patched = requested_engine() == "fsdp" and options.get("cpu") and \
        engage_fsdp_on_cpu(accelerator, options["fsdp_plugin"])
    check_engine(accelerator)
    return accelerator


def check_engine(accelerator):
    """Make sure the engine the launcher asked for is the one accelerate runs; stop otherwise."""
    from accelerate.utils import DistributedType

    wanted = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(requested_engine())
    if wanted is not None and accelerator.distributed_type != wanted:
        raise EngineError(f"the launch asks for {wanted.value} but accelerate set up "
                           f"{accelerator.distributed_type.value}; refusing to train without the requested sharding")
    world_size = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))  # MPI launches set no WORLD_SIZE
    if accelerator.num_processes != world_size:
        raise EngineError(f"the launcher started {world_size} processes but accelerate sees "
                           f"{accelerator.num_processes} ({accelerator.distributed_type.value})")


def engine_description(accelerator) -> str:
    """The engine really in use, its sharding and the process count, in words (the start-up line)."""
    from accelerate.utils import DistributedType

    n = accelerator.num_processes
    where = f"{n} process(es) on {accelerator.device.type}" + (" (one process: it holds everything)" if n == 1 else "")
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"]
        shards = {0: "nothing sharded (plain data parallel)", 1: "optimizer states sharded",
                  2: "optimizer states and gradients sharded", 3: "parameters, gradients and optimizer states sharded"}
        return f"DeepSpeed ZeRO-{stage}: {shards[stage]} over {where}"
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        full = plugin.reshard_after_forward in (True, "FULL_SHARD") or \
            getattr(plugin.reshard_after_forward, "name", "") == "FULL_SHARD"
        sharding = ("parameters, gradients and optimizer states sharded" if full else
                    "gradients and optimizer states sharded, parameters kept after forward")
        return f"FSDP{plugin.fsdp_version}: {sharding}, one unit per " \
               f"{', '.join(plugin.transformer_cls_names_to_wrap or ['(auto policy)'])}, over {where}"
    if n > 1:
        return f"DDP: a full replica on each of {where}"
    return f"single process on {accelerator.device.type}, nothing sharded"


def mixed_precision_in_use(accelerator) -> str:
    """accelerate's setting, or under DeepSpeed (which casts itself) what its config enables."""
    if accelerator.state.deepspeed_plugin is None:
        return accelerator.mixed_precision
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return next((kind for kind in ("bf16", "fp16") if config.get(kind, {}).get("enabled") is True), "no")


def weights_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: no process holds the whole model between steps."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and \
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"] == 3


def param_numel(p) -> int:
    """A parameter's full element count (ZeRO-3 leaves only the partition in the tensor; DTensors report global)."""
    return getattr(p, "ds_numel", None) or p.numel()


def local_numel(p) -> int:
    """The elements of a parameter (or optimizer state) this process holds."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel() + p.data.numel()  # ZeRO-3 partition, plus the full tensor while it is gathered
    if hasattr(p, "to_local"):
        return p.to_local().numel()  # FSDP2 DTensor shard
    return p.numel()


def engine_record(accelerator, model, optimizer) -> dict:
    """Proof of what each process holds during training: the elements of layer 0's query_key_value weight and of
    the AdamW first moments on this process, gathered from every process."""
    import torch

    name, weight = next((n, p) for n, p in accelerator.unwrap_model(model).named_parameters()
                        if "layers.0.self_attention.query_key_value" in n and n.endswith("weight"))
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer, then torch's AdamW
        inner = inner.optimizer
    states = sum(local_numel(state["exp_avg"]) for state in inner.state.values() if "exp_avg" in state)
    local = torch.tensor([local_numel(weight), states], device=accelerator.device)
    gathered = accelerator.gather(local[None]).tolist()
    return {"engine": engine_description(accelerator), "distributed_type": accelerator.distributed_type.value,
            "fsdp_on_cpu_patched": bool(getattr(accelerator, "fsdp_on_cpu_patched", False)),
            "num_processes": accelerator.num_processes, "block_weight": name,
            "block_weight_numel": param_numel(weight), "block_weight_numel_per_rank": [g[0] for g in gathered],
            "adam_state_numel_per_rank": [g[1] for g in gathered]}
