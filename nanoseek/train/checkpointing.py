"""Trainer checkpoints: out/checkpoints/step-NNNNNN/ holds the model in the Hugging Face layout,
the tokenizer and trainer.pt (step, optimizer state, RNG states, loop counters); a run with --fsdp
keeps its optimizer state (and the model, sharded) in dcp/ beside them instead. Written into a
hidden temp folder and renamed into place (a kill never leaves half a checkpoint); the newest is
the resume point; only the last `keep_last` are kept. With async saves (`--async-save`, --fsdp)
the sharded state of step N is written in the background while training goes on, and step N is
renamed into place only once every rank has finished writing it: before the next save, or at the
end of the run. A kill meanwhile leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import os
import re
import shutil

import torch

from ..checkpoint import CheckpointError
from ..io import atomic_torch_save
from ..parallel import barrier
from .metrics import say

CKPT_RE = re.compile(r"step-(\d{6,})")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints (renamed into place, so never half-written), oldest first."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = CKPT_RE.fullmatch(name)
        if m and os.path.exists(os.path.join(root, name, "trainer.pt")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def resume_point(out: str, resume: bool, quiet: bool = False) -> str | None:
    """The newest complete checkpoint in out/checkpoints to continue from (None: start fresh). A fresh
    run into a folder that holds an earlier run's checkpoints is refused: its checkpoints would mix
    with those (and `keep_last` prune its own in their favour)."""
    ckpts = list_checkpoints(out)
    if ckpts and not resume:
        raise CheckpointError(f"{out}/checkpoints holds an earlier run's checkpoints (newest: step {ckpts[-1][0]}): "
                              f"pass --resume to continue it, or use another --out (or remove them)")
    if resume and not ckpts:
        say(f"--resume: no complete checkpoint in {out}/checkpoints, starting fresh", quiet=quiet)
    return ckpts[-1][1] if ckpts else None


def checkpoint_tmp_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f".tmp-step-{step:06d}")


def save_parallel_checkpoint(par, out: str, step: int, opt, tokenizer, state: dict, keep_last: int) -> str | None:
    """Every rank's part of a checkpoint of the whole model (`par`: a nanoseek.parallel.Parallel),
    then rank 0 writes it in the Hugging Face layout and renames it into place. Collective."""
    tmp = checkpoint_tmp_dir(out, step)
    if par.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    opt_state = par.save_optimizer(opt, tmp)  # pipeline ranks write their own files into tmp
    whole = par.full_model()
    barrier()
    final = save_checkpoint(out, step, whole, opt_state, tokenizer, state, keep_last, fresh=False) if par.main else None
    barrier()
    return final


class CheckpointWriter:
    """The run's checkpoints, written through `par` (a nanoseek.parallel.Parallel). Synchronous:
    each `save` is `save_parallel_checkpoint`. Asynchronous: `save` leaves step N in its temp folder
    while the sharded state is still being written; the next `save` (or `finish`) waits for every
    rank's write, then renames it into place. Collective."""

    def __init__(self, par, out: str, keep_last: int, asynchronous: bool = False):
        self.par, self.out, self.keep_last, self.asynchronous = par, out, keep_last, asynchronous
        self.unpublished: int | None = None  # the step whose temp folder waits for its sharded state

    def save(self, step: int, opt, tokenizer, state: dict) -> None:
        if not self.asynchronous:
            save_parallel_checkpoint(self.par, self.out, step, opt, tokenizer, state, self.keep_last)
            return
        self.finish()
        par, tmp = self.par, checkpoint_tmp_dir(self.out, step)
        if par.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        opt_state = par.save_optimizer(opt, tmp)  # returns once staged; written in the background
        whole = par.full_model()
        barrier()
        if par.main:
            write_checkpoint_files(tmp, step, whole, opt_state, tokenizer, state)
        self.unpublished = step

    def finish(self) -> None:
        """Wait for the pending background write on every rank, then rename its checkpoint into place."""
        if self.unpublished is None:
            return
        self.par.wait_saves()
        barrier()  # every rank's shards are on disk
        if self.par.main:
            publish_checkpoint(self.out, self.unpublished, self.keep_last)
        self.unpublished = None
        barrier()


def save_checkpoint(out: str, step: int, model, optimizer, tokenizer, state: dict, keep_last: int,
                     fresh: bool = True) -> str:
    """Write into a hidden temp folder, then rename it into place: a kill at any moment leaves
    either the previous set of checkpoints or the new one, never a half-written one. (When other
    ranks have added their files to the temp folder first, `fresh` is False.)"""
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    tmp = checkpoint_tmp_dir(out, step)
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint_files(tmp, step, model, optimizer, tokenizer, state)
    return publish_checkpoint(out, step, keep_last)


def write_checkpoint_files(tmp: str, step: int, model, optimizer, tokenizer, state: dict) -> None:
    """The model in the Hugging Face layout, the tokenizer and trainer.pt into the temp folder `tmp`."""
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    # a dict: already gathered; None: written sharded into the checkpoint's dcp/ by every rank
    opt_state = optimizer if optimizer is None or isinstance(optimizer, dict) else optimizer.state_dict()
    payload = {"step": step, "optimizer": opt_state, "cpu_rng": torch.get_rng_state(), **state}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_torch_save(payload, os.path.join(tmp, "trainer.pt"))


def publish_checkpoint(out: str, step: int, keep_last: int) -> str:
    """Rename step's complete temp folder into place and prune all but the last `keep_last`."""
    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    tmp = checkpoint_tmp_dir(out, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def export_final_model(out: str) -> None:
    """The newest checkpoint's model at the run's root, so that from_pretrained(out) works; not
    its trainer state or its sharded folder (each file written beside, then renamed)."""
    final_ckpt = list_checkpoints(out)[-1][1]
    for f in os.listdir(final_ckpt):
        if f != "trainer.pt" and os.path.isfile(os.path.join(final_ckpt, f)):
            shutil.copy2(os.path.join(final_ckpt, f), os.path.join(out, f + ".tmp"))
            os.replace(os.path.join(out, f + ".tmp"), os.path.join(out, f))


def load_trainer_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, "trainer.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path}: corrupt or unreadable trainer state ({type(e).__name__}: {e})") from None
