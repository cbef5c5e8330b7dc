"""Multi-process JAX: starting the distributed runtime from flags or environment variables.

Every process of a multi-host job runs the same program; before any other JAX call each one
calls `initialize`, after which `jax.devices()` lists every process's devices and
`jax.process_index()` / `jax.process_count()` say which share of the data a process reads.

Three ways to say how processes find each other, in this order of precedence:
  1. explicit flags (`--coordinator_address=host:port --num_processes=N --process_id=i`),
  2. the environment JAX itself reads (`JAX_COORDINATOR_ADDRESS`, plus our `JAX_NUM_PROCESSES`
     and `JAX_PROCESS_ID`, which launch scripts can export per process),
  3. `--distributed=auto`: JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI).
With none of them the run is single-process and `initialize` does nothing.

On CPU the collectives between processes need an implementation; we pick gloo (it ships with
jaxlib), which is what the multi-process tests run on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

MODES = ("off", "auto", "explicit")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Attributes:
      mode: "off" (one process), "auto" (JAX cluster auto-detection) or "explicit" (the three
        fields below).
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: processes in the job.
      process_id: this process, in [0, num_processes).
      local_device_ids: accelerator ids this process drives (empty = all it sees).
      cpu_collectives: cross-process collectives on CPU ("gloo" or "mpi").
      timeout_s: how long to wait for all processes to join.
    """

    mode: str = "off"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = ()
    cpu_collectives: str = "gloo"
    timeout_s: int = 300

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"distributed mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "explicit":
            return
        problems = []
        host, sep, port = self.coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            problems.append(f"coordinator_address must be host:port, got {self.coordinator_address!r}")
        if self.num_processes < 1:
            problems.append(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < max(self.num_processes, 1):
            problems.append(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if problems:
            raise ValueError("bad distributed settings: " + "; ".join(problems))


def from_settings(
    mode: str = "",
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    local_device_ids: str = "",
    environ: Mapping[str, str] | None = None,
    **kwargs,
) -> DistributedConfig:
    """A config from flag values, falling back to the environment for unset ones.

    `mode` "" means: "explicit" when an address is given (flag or `JAX_COORDINATOR_ADDRESS`),
    else "off".
    """
    env = os.environ if environ is None else environ

    def env_int(name: str, default: int) -> int:
        text = env.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None

    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    if num_processes <= 0:
        num_processes = env_int("JAX_NUM_PROCESSES", 0)
    if process_id < 0:
        process_id = env_int("JAX_PROCESS_ID", -1)
    ids_text = local_device_ids or env.get("JAX_LOCAL_DEVICE_IDS", "")
    try:
        ids = tuple(int(x) for x in ids_text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"local device ids must be comma-separated integers, got {ids_text!r}") from None
    mode = mode or ("explicit" if address else "off")
    return DistributedConfig(mode=mode, coordinator_address=address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=ids, **kwargs)


def define_flags() -> None:
    """absl flags read by `from_flags` (call once, at import time of a launcher)."""
    from absl import flags

    flags.DEFINE_enum("distributed", "", ["", *MODES], "Multi-process mode; default: explicit when a "
                      "coordinator address is set (flag or JAX_COORDINATOR_ADDRESS), else off.")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (env JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", 0, "Processes in the job (env JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", -1, "This process's index (env JAX_PROCESS_ID).")
    flags.DEFINE_string("local_device_ids", "", "Comma-separated accelerator ids of this process "
                        "(env JAX_LOCAL_DEVICE_IDS; default all visible).")


def from_flags() -> DistributedConfig:
    """The config given by the flags of `define_flags` (and the environment)."""
    from absl import flags

    f = flags.FLAGS
    return from_settings(f.distributed, f.coordinator_address, f.num_processes, f.process_id,
                         f.local_device_ids)


def initialize(cfg: DistributedConfig) -> bool:
    """Starts JAX's distributed runtime as `cfg` says; returns whether this is a multi-process
    run. Must run before anything touches a JAX backend. Calling it again is a no-op."""
    if cfg.mode == "off":
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if cfg.mode == "auto":
        jax.distributed.initialize(initialization_timeout=cfg.timeout_s)
    else:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
            process_id=cfg.process_id, local_device_ids=list(cfg.local_device_ids) or None,
            initialization_timeout=cfg.timeout_s, cluster_detection_method="deactivate",
        )
    log.info("process %d of %d: %d local devices, %d global", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1
