"""Hugging Face Accelerate: ``save_state`` / ``load_state`` as ckpt checkpoints.

    from ckpt.integrations.accelerate import load_state, save_state

    accelerator = Accelerator()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(my_counter)         # anything with state_dict()
    start = load_state(accelerator, "s3://bucket/run")          # None on a fresh start
    for step in range(0 if start is None else start + 1, total):
        ...
        if step % 100 == 0:
            save_state(accelerator, "s3://bucket/run", step)   # every process calls it

What ``Accelerator.save_state(dir)`` writes (the models' weights, the optimizers, schedulers and
gradient scaler, the registered objects, the stateful data loaders' positions, every process's
Python / NumPy / torch / accelerator RNG states and ``accelerator.step``) is one ckpt step
under one create-only manifest instead of a folder of pickles (``optimizer.bin``,
``random_states_0.pkl``, ``custom_checkpoint_0.pkl``): no pickle is written or read, a killed
save leaves no partial step (``get_last_checkpoint``'s failure mode), and the root may be any
fsspec URL. With several processes (DDP) the replicated weights and optimizer state are written
once (``ckpt.parallel.torchrun.save``), each process's RNG states under its own rank.

Not covered: FSDP and DeepSpeed plugins (refused, naming the plugin: use ``ckpt.dcp`` with
FSDP2), and a data loader's sampler object (Accelerate pickles a ``SeedableRandomSampler``): on
resume skip the batches already seen (``accelerator.skip_first_batches``) or use stateful data
loaders (``DataLoaderConfiguration(use_stateful_dataloader=True)``), whose state is saved.
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from ckpt.errors import PlanError, StateError
from ckpt.format.manifest import Manifest
from ckpt.integrations import _rng
from ckpt.lifecycle import restore as restorer
from ckpt.lifecycle import save as saver
from ckpt.lifecycle.steps import latest_step
from ckpt.options import RestoreOptions, SaveOptions
from ckpt.parallel import torchrun
from ckpt.storage import Root, root_url

_UNSUPPORTED = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.MEGATRON_LM: "Megatron-LM"}


def _check(accelerator: Accelerator) -> None:
    what = _UNSUPPORTED.get(accelerator.distributed_type)
    if what is not None:
        raise PlanError(f"ckpt.integrations.accelerate does not save {what} states yet; with FSDP2 save through ckpt.dcp")


def _stateful(dataloader: Any) -> bool:
    return bool(getattr(dataloader, "use_stateful_dataloader", False))


def state_of(accelerator: Accelerator) -> dict[str, Any]:
    """What ``Accelerator.save_state`` saves, as one state ckpt stores (this process's RNG
    states under ``rng/<process index>``)."""
    _check(accelerator)
    rank = accelerator.process_index
    state: dict[str, Any] = {
        "models": {str(i): accelerator.unwrap_model(m).state_dict() for i, m in enumerate(accelerator._models)},
        "optimizers": {str(i): o.state_dict() for i, o in enumerate(accelerator._optimizers)},
        "schedulers": {str(i): s.state_dict() for i, s in enumerate(accelerator._schedulers)},
        "custom": {str(i): o.state_dict() for i, o in enumerate(accelerator._custom_objects)},
        "dataloaders": {str(i): dl.state_dict() for i, dl in enumerate(accelerator._dataloaders) if _stateful(dl)},
        "rng": {str(rank): _rng.capture()},
        "accelerator_step": accelerator.step,
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    return state


def save_state(
    accelerator: Accelerator,
    root: Root,
    step: int,
    *,
    options: SaveOptions | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest | None:
    """Save what ``accelerator.save_state`` would as checkpoint ``step`` under ``root``; every
    process calls it. Returns the manifest on the process that committed (the only one with
    several processes: the others get None)."""
    root = root_url(root)
    state = state_of(accelerator)
    if accelerator.num_processes == 1:
        return saver.save(root, state, step=step, options=options, storage_options=storage_options)
    torchrun.save(root, state, step=step, plain_tensors="auto", options=options, storage_options=storage_options)
    return None


def load_state(
    accelerator: Accelerator,
    root: Root,
    step: int | None = None,
    *,
    options: RestoreOptions | None = None,
    storage_options: dict[str, Any] | None = None,
) -> int | None:
    """Load checkpoint ``step`` (default: the newest committed one, as the main process sees
    it) into what the accelerator prepared and registered, as ``accelerator.load_state`` does.
    Returns the step loaded, or None when ``root`` holds no checkpoint yet."""
    _check(accelerator)
    root = root_url(root)
    if step is None:
        chosen = [latest_step(root, storage_options=storage_options) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        step = chosen[0]
        if step is None:
            return None
    saved = restorer.restore(root, step, options=options, storage_options=storage_options)
    _apply(accelerator, saved, f"{root} step {step}")
    return step


def _apply(accelerator: Accelerator, saved: Any, where: str) -> None:
    def part(name: str, count: int) -> dict[str, Any]:
        got = saved.get(name, {})
        if len(got) != count:
            raise StateError(f"{where}: holds {len(got)} {name}, the accelerator has {count}")
        return dict(got)

    models = part("models", len(accelerator._models))
    for i, m in enumerate(accelerator._models):
        accelerator.unwrap_model(m).load_state_dict(models[str(i)])
    optimizers = part("optimizers", len(accelerator._optimizers))
    schedulers = part("schedulers", len(accelerator._schedulers))
    custom = part("custom", len(accelerator._custom_objects))
    for i, o in enumerate(accelerator._optimizers):
        o.load_state_dict(optimizers[str(i)])
    for i, s in enumerate(accelerator._schedulers):
        s.load_state_dict(schedulers[str(i)])
    for i, c in enumerate(accelerator._custom_objects):
        c.load_state_dict(custom[str(i)])
    loaders = saved.get("dataloaders", {})
    for i, dl in enumerate(accelerator._dataloaders):
        if str(i) in loaders:
            dl.load_state_dict(loaders[str(i)])
    if accelerator.scaler is not None and "scaler" in saved:
        accelerator.scaler.load_state_dict(saved["scaler"])
    accelerator.step = int(saved.get("accelerator_step", 0))
    rng = saved.get("rng", {}).get(str(accelerator.process_index))
    if rng is None:  # another number of processes: this one's RNG was not saved
        return
    _rng.apply(rng)
