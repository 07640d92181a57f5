"""The output folder and its checkpoints: what a run may replace there, atomic checkpoints, and resuming.

The loop uses two verbs: `load()` once (the step to continue from) and `save(step)` after every step (a checkpoint
every `every` steps). Everything before them only reads, so bad input stops a run before the folder changes:

    checkpointer = Checkpointer("output/run", resume_from="latest", every=300)   # reads the folder, decides
    ... data, tokenizer and model are built, every check passed ...
    checkpointer.start(accelerator, tokenizer_files)                           # the first write
    start_step = checkpointer.load(accelerator)
    for step in range(start_step + 1, total + 1):
        ...
        checkpointer.save(step, model)

A checkpoint is written into checkpoints/tmp-step-N (with a started marker), fsynced, marked complete and renamed to
checkpoints/step-N: a folder without the completion marker is never taken for a checkpoint.
"""

import json
import os
import re
import shutil
from pathlib import Path

from .errors import DiskFull, InputError, Refusal

CHECKPOINT_MARKER = "checkpoint_complete.json"
# Written first into a checkpoint's temporary folder: it tells train.py's own interrupted writes from a user's folder.
CHECKPOINT_STARTED = "checkpoint_started.json"
CHECKPOINT_NAME = re.compile(r"step-\d{7}")
TEMPORARY_CHECKPOINT_NAME = re.compile(r"tmp-step-\d{7}")
TRAINER_STATE = "trainer_state.json"
# A from-scratch run's tokenizer: written whole into TOKENIZER_TEMPORARY, renamed to TOKENIZER_COPY by start(), where
# resumes find it until the finished folder's own tokenizer files replace it.
TOKENIZER_COPY, TOKENIZER_TEMPORARY = "tokenizer", "tokenizer.tmp"
# What train.py writes into the output folder (the saved model, card, metrics, the tokenizer working copy); anything
# else there is a user's file and is never deleted.
OWN_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png", "metrics.jsonl",
             "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "added_tokens.json", "chat_template.jinja",
             # the code files a saved folder carries (local_glm.CODE_FILES; a test keeps the two lists equal)
             "configuration_glm.py", "modeling_glm.py", "chat_glm.py", "compat_glm.py", "quantization_glm.py",
             "tokenization_glm.py", "tool_parser_glm.py"}
OWN_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OWN_FOLDERS = {TOKENIZER_COPY, TOKENIZER_TEMPORARY, "adapter", "runs"}


class OutputDirError(InputError):
    """An --output_dir that train.py may not write into as asked."""


class NonFiniteLoss(Refusal, RuntimeError):
    """The loss or the weights stopped being finite; the message names the last good checkpoint."""


class Checkpointer:
    """The output folder's policy and the run's checkpoints. Constructing it only reads: it finds the checkpoint to
    resume (`resume_from`: "latest" or a folder) and decides what `start` removes, raising OutputDirError where
    starting would replace a run or someone's files, or where the folder is (or holds, or lies in) one of the run's
    `inputs` ({flag: path}, e.g. the model being fine-tuned)."""

    def __init__(self, output_dir, *, resume_from=None, overwrite=False, every=None, keep=2, inputs=None):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / "checkpoints"
        self.every, self.keep = every, keep
        refuse_input_folders(self.output_dir, inputs or {})
        self.resume_from = find_checkpoint(resume_from, self.output_dir)
        self.remove, self.foreign = check_output_dir(self.output_dir, overwrite, self.resume_from)
        self.last = None
        self.accelerator = None

    def tokenizer_folder(self) -> Path:
        """The tokenizer a resumed from-scratch run trained: the working copy beside its checkpoints, or (a finished
        run, whose working copy is gone) the run folder's own tokenizer files."""
        run_dir = self.resume_from.parent.parent
        for folder in (run_dir / TOKENIZER_COPY, run_dir):
            if (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer.json").is_file():
                return folder
        raise InputError(f"cannot resume from {self.resume_from}: the tokenizer its run trained is neither "
                                f"in {run_dir / TOKENIZER_COPY} nor in {run_dir}; give it with --tokenizer_name")

    def start(self, accelerator, tokenizer_files=None, run=None):
        """The first change to the folder, once data, tokenizer and model are ready and every check has passed:
        create it, remove what the constructor planned, and write a from-scratch run's new tokenizer (its saved
        files, {name: bytes}) where resumes find it (whole into TOKENIZER_TEMPORARY, fsynced, renamed to
        TOKENIZER_COPY). `run` holds what a step of this
        run means ({setting: value}: batch, accumulation, processes, data, model, adapter); every checkpoint records
        it, and a resume whose `run` differs is refused, naming each difference."""
        self.accelerator, self.run = accelerator, dict(run or {})
        # A checkpoint that cannot be resumed exactly is refused before the folder changes.
        self.start_step = check_checkpoint(self.resume_from, accelerator.num_processes) if self.resume_from else 0
        if self.resume_from:
            check_same_run(self.resume_from, self.run)
        work, temporary = self.output_dir / TOKENIZER_COPY, self.output_dir / TOKENIZER_TEMPORARY
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.foreign:
                accelerator.print(f"note: {self.output_dir} also holds files train.py did not write; left "
                                  f"untouched: {_listing(self.output_dir, self.foreign)}")
            for path in self.remove:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            if temporary.exists():
                shutil.rmtree(temporary)  # an interrupted copy of an earlier start
            if tokenizer_files is not None:
                temporary.mkdir()
                for name, content in tokenizer_files.items():
                    (temporary / name).write_bytes(content)
                fsync_tree(temporary)
                if work.exists():
                    shutil.rmtree(work)  # a new run's: no checkpoint uses the old copy (check_output_dir)
                os.rename(temporary, work)
                fsync_dir(self.output_dir)
        accelerator.wait_for_everyone()
        self.last = self.resume_from or (complete_checkpoints(self.folder)[-1:] or [None])[0]

    def load(self, accelerator) -> int:
        """Restore the prepared model, optimizer, scheduler and RNG states from the checkpoint being resumed and
        return its step (0 for a new run)."""
        if self.resume_from is None:
            return 0
        accelerator.load_state(str(self.resume_from))
        accelerator.print(f"resumed from {self.resume_from} at step {self.start_step}")
        return self.start_step

    def save(self, step: int, model) -> bool:
        """A checkpoint of `step` when one is due (every `every` steps), after checking that the weights are finite;
        keeps the newest `keep`. Returns whether it wrote one."""
        if not (self.every and step % self.every == 0):
            return False
        self.ensure_finite(model, step)
        self.last = save_checkpoint(self.accelerator, self.folder, step, {"step": step, "run": self.run}, self.keep)
        return True

    def ensure_finite(self, model, step: int):
        """The loss was computed before the optimizer step, so only the weights show whether that step broke them.
        Raises NonFiniteLoss naming the parameters and the last good checkpoint."""
        import torch

        accelerator = self.accelerator
        bad = [name for name, p in model.named_parameters()
               if p.requires_grad and not torch.isfinite(p.detach()).all()]
        total = accelerator.reduce(torch.tensor(float(len(bad)), device=accelerator.device), "sum").item()
        if total:
            names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else \
                "(on another process)"
            accelerator.end_training()
            raise NonFiniteLoss(f"weights are not finite after step {step} ({names}): stopping before saving them. "
                                f"The last good checkpoint is {self.last_description()}; lower --learning_rate or "
                                "check the data, then resume with --resume_from_checkpoint.")

    def disk_full(self, error: BaseException):
        """The one-line refusal for `error` if it came from a full disk under the output folder, else None."""
        return disk_full(error, self.output_dir, self.last and str(self.last))

    def last_description(self) -> str:
        return str(self.last) if self.last else "none (no checkpoint was written yet)"


# ---------------------------------------------------------------------------------------------------------------
# The output folder at start: refuse to replace a run or a user's files (run_clm's --overwrite_output_dir rule).

def _own_checkpoint_entry(path: Path) -> bool:
    """A complete checkpoint, or an interrupted write of one (empty, or carrying the started marker)."""
    if not path.is_dir():
        return False
    if CHECKPOINT_NAME.fullmatch(path.name):
        return (path / CHECKPOINT_MARKER).is_file()
    if TEMPORARY_CHECKPOINT_NAME.fullmatch(path.name):
        return (path / CHECKPOINT_STARTED).is_file() or not any(path.iterdir())
    return False


def inspect_output_dir(folder: Path):
    """(own, foreign): train.py's entries in `folder` (checkpoints/ entries one by one) and everything else."""
    own, foreign = [], []
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--output_dir {folder} is a file, not a folder")
    if not folder.is_dir():
        return own, foreign
    for entry in sorted(folder.iterdir()):
        if entry.name == "checkpoints" and entry.is_dir():
            for item in sorted(entry.iterdir()):
                (own if _own_checkpoint_entry(item) else foreign).append(item)
        elif (entry.is_file() and (entry.name in OWN_FILES or OWN_SHARD.fullmatch(entry.name))) or \
                (entry.is_dir() and entry.name in OWN_FOLDERS):
            own.append(entry)
        else:
            foreign.append(entry)
    return own, foreign


def _listing(folder: Path, paths) -> str:
    names = [str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:15]) + (f" and {len(names) - 15} more" if len(names) > 15 else "")


def refuse_input_folders(folder: Path, inputs: dict):
    """An output folder that is, holds or lies inside a folder the run reads (the base model, its tokenizer) would
    overwrite or delete it: refused whatever the flags, naming both paths."""
    target = Path(folder).resolve()
    for flag, path in inputs.items():
        if not path or not Path(path).is_dir():
            continue  # a Hub id, or nothing
        source = Path(path).resolve()
        relation = ("is" if target == source else "holds" if target in source.parents
                    else "lies inside" if source in target.parents else None)
        if relation:
            raise OutputDirError(
                f"--output_dir {folder} {relation} {flag} {path}: train.py never writes into the model it reads, "
                "with or without --overwrite_output_dir; give a new --output_dir (for a fine-tune the default is "
                f"output/{source.name}-finetuned)")


def check_output_dir(folder: Path, overwrite: bool, checkpoint):
    """(what start removes, the user's files it leaves); raises OutputDirError (naming the folder and the files
    found) where starting would replace a run or someone's files. Reads only; runs before any write.

    - Empty or new folder: fine. Interrupted writes of train.py (checkpoints/tmp-step-N with its started marker,
      tokenizer.tmp) are always removed.
    - Resuming (a checkpoint found): everything is kept; other files are left as they are.
    - A complete checkpoint and neither flag: refused, saying how to resume or start over (no auto-resume).
    - Any other content: refused without --overwrite_output_dir; with it train.py's own files are removed first and
      the others are left untouched. A foreign entry inside checkpoints/ is always refused (its names are ours).
    """
    folder = Path(folder)
    own, foreign = inspect_output_dir(folder)
    intruders = [p for p in foreign if p.parent.name == "checkpoints" and p.parent.parent == folder]
    if intruders:
        raise OutputDirError(f"--output_dir {folder}: {_listing(folder, intruders)} in checkpoints/ is not a "
                             "checkpoint train.py wrote (no completion or started marker); checkpoints/ is "
                             "train.py's own folder, so move it out and start again")
    # tokenizer.tmp is only ever an interrupted copy: start() removes it before writing this run's.
    own = [p for p in own if p.name != TOKENIZER_TEMPORARY]
    stale = [p for p in own if TEMPORARY_CHECKPOINT_NAME.fullmatch(p.name)]
    kept = [p for p in own if p not in stale]
    if checkpoint is not None:
        return stale, foreign
    if overwrite:
        print(f"--overwrite_output_dir: replacing train.py's files in {folder}: {_listing(folder, own) or 'none'}")
        # Checkpoints first: a kill while removing never leaves a checkpoint without its run's tokenizer copy.
        return sorted(own, key=lambda p: p.parent.name != "checkpoints"), foreign
    complete = [p for p in kept if CHECKPOINT_NAME.fullmatch(p.name)]
    if complete:
        raise OutputDirError(f"--output_dir {folder} holds a run with a complete checkpoint ({complete[-1].name}; "
                             f"files found: {_listing(folder, kept + foreign)}); nothing was changed. Pass "
                             "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start "
                             "over (train.py's own files there are replaced, others left untouched).")
    if kept or foreign:
        raise OutputDirError(f"--output_dir {folder} is not empty: it holds {_listing(folder, kept + foreign)}; "
                             "nothing was changed. Use another folder, or pass --overwrite_output_dir to replace "
                             "train.py's own files there (other files are never deleted).")
    return stale, []


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: written into a temporary folder, fsynced, marked complete, then renamed into place.

def fsync_tree(folder: Path):
    """Every file and folder under `folder` on disk (the tests stop a run here to leave a half-written folder)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for directory in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fsync_dir(directory)


def fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(temporary: Path, step: int):
    """The completion marker, the last file of a checkpoint (the tests stop a run here, before it)."""
    with open(temporary / CHECKPOINT_MARKER, "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(folder: Path):
    """Checkpoints that carry the completion marker, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, folder: Path, step: int, state: dict, total_limit: int) -> Path:
    """accelerator.save_state of every process into checkpoints/tmp-step-N, then (main process) the trainer state,
    fsync, the completion marker and the rename to step-N; keeps the newest `total_limit` (0: all)."""
    final = folder / f"step-{step:07d}"
    temporary = folder / f"tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)  # ours: check_output_dir refuses anything else under checkpoints/
        temporary.mkdir(parents=True)
        (temporary / CHECKPOINT_STARTED).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(temporary / TRAINER_STATE, "w") as f:
                json.dump(state, f)
            fsync_tree(temporary)
            mark_complete(temporary, step)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # never complete; its space back (a full disk, often)
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        fsync_dir(folder)
        for old in complete_checkpoints(folder)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def disk_full(error: BaseException, folder: Path, last_checkpoint: str = None):
    """A DiskFull naming `folder`, the space left and the last complete checkpoint when `error` came from a full disk
    (ENOSPC anywhere in its chain, or a library's own words for it, such as torch's "unexpected pos", with under
    16 MiB left), else None."""
    import errno

    chain, link = [], error
    while link is not None and len(chain) < 10:
        chain.append(link)
        link = link.__cause__ or link.__context__
    try:
        free = shutil.disk_usage(next(p for p in [Path(folder), *Path(folder).parents] if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if not (any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) or (free is not None and free < 16 << 20)):
        return None
    left = f"{free / 2**20:.1f} MiB left" if free is not None else "space unknown"
    then = ("free some space, then continue with --resume_from_checkpoint latest" if last_checkpoint else
            "free some space and start again")
    return DiskFull(f"No space left on device in {folder} ({left}; {type(error).__name__}: {str(error)[:120]}). "
                    f"The last complete checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'}; "
                    f"{then}")


def find_checkpoint(resume_from, output_dir: Path):
    """The folder to resume from, or None (no --resume_from_checkpoint, or 'latest' with nothing complete yet)."""
    if resume_from in (None, ""):
        return None
    if resume_from == "latest":
        found = complete_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / CHECKPOINT_MARKER).exists():
        raise InputError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {CHECKPOINT_MARKER})")
    return path


def check_same_run(checkpoint: Path, run: dict):
    """A step means the rows it trains on and what they update: a resume under other settings would skip or repeat
    rows and mislabel the run. Refuses, naming each setting that differs from what the checkpoint recorded."""
    recorded = json.loads((checkpoint / TRAINER_STATE).read_text()).get("run")
    if recorded is None:
        print(f"note: {checkpoint} records no run settings (an older train.py wrote it): resuming without "
              "comparing them")
        return
    differences = [f"{key}: {recorded.get(key)!r} in the checkpoint, {run.get(key)!r} now"
                   for key in sorted(set(recorded) | set(run)) if recorded.get(key) != run.get(key)]
    if differences:
        raise InputError(f"cannot resume from {checkpoint}: this run's settings differ from the ones it was "
                         f"written with ({'; '.join(differences)}). Resume with the same settings, or start over "
                         "with --overwrite_output_dir (or another --output_dir).")


def check_checkpoint(checkpoint: Path, num_processes: int) -> int:
    """What accelerate's load_state would skip silently: every process's RNG file must be there and readable (an
    exact resume needs them), and the step must be known. Returns the step; raises naming the file."""
    from accelerate.utils import load

    for index in range(num_processes):
        path = checkpoint / f"random_states_{index}.pkl"
        try:
            states = load(path)
            missing = [key for key in ("random_state", "numpy_random_seed", "torch_manual_seed") if key not in states]
        except Exception as error:  # noqa: BLE001  any unreadable file is reported the same way
            raise InputError(f"cannot resume from {checkpoint}: the RNG state {path} is unreadable "
                             f"({type(error).__name__}: {error}); resume from another checkpoint") from None
        if missing:
            raise InputError(f"cannot resume from {checkpoint}: the RNG state {path} lacks {missing}")
    try:
        step = json.loads((checkpoint / TRAINER_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"cannot resume from {checkpoint}: {checkpoint / TRAINER_STATE} is unreadable "
                         f"({type(error).__name__}: {error})") from None
    if not (isinstance(step, int) and step >= 0):
        raise InputError(f"cannot resume from {checkpoint}: {checkpoint / TRAINER_STATE} step is {step!r}")
    return step
