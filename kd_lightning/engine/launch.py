"""Ranks started by a launcher (torchrun, SLURM's srun) agree on whether a run starts, before any of them
writes into its folder or waits for the others.

Every rank of such a launch runs `kd-train` itself. Rank 0 alone decides whether the run may start (its
folder is free, it holds no finished run unless resume=auto, resume=auto found it finished, the config is
valid, ...) and publishes its verdict; the other ranks wait for it before they write anything, then all
refuse with the same one-line error, all skip a finished run, or all start. Without this a rank whose
rank 0 refused would wait for it in the process group's setup until the job's time limit.

The channel: under torchrun the elastic agent's key-value store (the one the process group is later made
with: every rank is its client, it lives as long as the launch), a key per restart of the launch; under
SLURM (no torchrun) a file in the run folder's `.kd/` named after the job, step and restart count, which
every node sees as it sees the run folder. Ranks that Lightning itself starts (trainer=ddp on one machine)
are started by rank 0 after its verdict and need none of this.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from kd_lightning.errors import ConfigError
from kd_lightning.files import atomic_write
from kd_lightning.plain import Plain

GO, SKIP, REFUSE = "go", "skip", "refuse"
WAIT_SECONDS = 600  # how long the other ranks wait for rank 0's verdict
ACK_SECONDS = 30  # how long rank 0 waits for them to have read a refusal before it exits


@dataclass(frozen=True)
class Verdict:
    kind: str  # go | skip | refuse
    message: str = ""


agreed: Verdict | None = None  # the verdict this process already waited for (kd-train, before Hydra)


def refusal(e: BaseException) -> Verdict:
    """What the other ranks are told when rank 0 stops before the run starts."""
    if isinstance(e, ConfigError):
        return Verdict(REFUSE, str(e))
    return Verdict(
        REFUSE, f"rank 0 stopped before the run started ({type(e).__name__}: {e}); its log says why"
    )


class Peers:
    """This process's rank among the ranks a launcher started, and the channel to rank 0's verdict."""

    def __init__(self, rank: int, world: int, channel: _Channel):
        self.rank, self.world, self.channel = rank, world, channel
        self.published = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def publish(self, verdict: Verdict) -> None:
        """Rank 0: say whether the run starts (once; later calls are ignored). A refusal or a skip waits (a
        little) until the other ranks have read it: rank 0 then exits, and torchrun tears the launch down."""
        if not self.leader or self.published:
            return
        self.channel.put(json.dumps({"kind": verdict.kind, "message": verdict.message}))
        self.published = True
        if verdict.kind != GO:
            self.channel.await_readers(self.world - 1, ACK_SECONDS)

    def wait(self) -> Verdict:
        """The other ranks: rank 0's verdict (a ConfigError if none comes within WAIT_SECONDS)."""
        raw = self.channel.get(WAIT_SECONDS)
        if raw is not None:
            self.channel.mark_read()
        if raw is None:
            raise ConfigError(
                f"rank {self.rank} of {self.world}: rank 0 did not say within {WAIT_SECONDS} s whether the run may "
                "start (did it fail to start? its log says why)"
            )
        data = json.loads(raw)
        return Verdict(str(data["kind"]), str(data.get("message", "")))


class _Channel:
    def put(self, value: str) -> None: ...

    def get(self, timeout: float) -> str | None: ...

    def mark_read(self) -> None:
        """A follower has the verdict."""

    def await_readers(self, n: int, timeout: float) -> None:
        """The leader: wait until `n` followers have the verdict (or `timeout`)."""


class _AgentStore(_Channel):
    """torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE): every rank is a client."""

    def __init__(self, env: Mapping[str, str]):
        from torch.distributed import TCPStore

        self.key = f"kd_lightning/verdict/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = TCPStore(
            env["MASTER_ADDR"],
            int(env["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=WAIT_SECONDS),
        )

    def put(self, value: str) -> None:
        self.store.set(self.key, value)

    def get(self, timeout: float) -> str | None:
        try:
            self.store.wait([self.key], timedelta(seconds=timeout))
        except Exception:  # noqa: BLE001  (torch raises DistStoreError or RuntimeError on a timeout)
            return None
        return self.store.get(self.key).decode()

    def mark_read(self) -> None:
        self.store.add(self.key + "/read", 1)

    def await_readers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.store.add(self.key + "/read", 0) < n and time.monotonic() < deadline:
            time.sleep(0.05)


class _File(_Channel):
    """A file in the run folder's `.kd/`, one per launch (SLURM job, step and restart)."""

    def __init__(self, path: Path):
        self.path = path

    def put(self, value: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(value))

    def get(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.path.is_file():
                return self.path.read_text()
            time.sleep(0.2)
        return None


def peers(out: Path, env: Mapping[str, str] = os.environ) -> Peers | None:
    """The launch's ranks, when a launcher started several (None: one process, or Lightning's own ranks)."""
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None  # no store to share before the process group exists (torchrun always has one)
        return Peers(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), _AgentStore(env))
    if slurm_tasks(env):
        launch = ".".join(env.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
        channel = _File(Path(out) / ".kd" / f"verdict-{launch}.json")
        return Peers(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), channel)
    return None


def slurm_tasks(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of several tasks SLURM started (srun), as Lightning's SLURMEnvironment
    tells: an interactive shell (job name bash or interactive) is not."""
    return (
        int(env.get("SLURM_NTASKS", "1")) > 1
        and "SLURM_PROCID" in env
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    )


def expected_world(trainer: Mapping[str, Plain]) -> int | None:
    """The process count a Trainer config asks for (devices × num_nodes), None when it cannot be told."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, list):
        devices = len(devices)
    if not (str(devices).isdigit() and str(nodes).isdigit()):
        return None  # auto, -1: Lightning counts them
    return int(str(devices)) * int(str(nodes))


def check_world(trainer: Mapping[str, Plain], env: Mapping[str, str] = os.environ) -> None:
    """Inside a job a launcher started (torchrun, srun): its process count must be the Trainer's
    devices × num_nodes, checked before any data is read (Lightning finds out after, with a traceback)."""
    if "TORCHELASTIC_RUN_ID" in env:
        world, where = env.get("WORLD_SIZE"), "torchrun's WORLD_SIZE"
        per_node = env.get("LOCAL_WORLD_SIZE")
    elif slurm_tasks(env):
        world, where = env.get("SLURM_NTASKS"), "SLURM's SLURM_NTASKS"
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or None
    else:
        return
    want = expected_world(trainer)
    if world is None or want is None or int(world) == want:
        return
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    hint = f" (tasks per node: {per_node})" if per_node else ""
    raise ConfigError(
        f"the launcher started {world} processes ({where}){hint}, but trainer.devices={devices} × "
        f"trainer.num_nodes={nodes} = {want}: set trainer.devices to the processes per node and "
        "trainer.num_nodes to the nodes"
    )


POOL = "gpu_pool"  # conf/hydra/launcher/gpu_pool.yaml


def pool_devices(trainer: Mapping[str, Plain], job_num: int, gpus: int) -> dict[str, Plain]:
    """The Trainer's arguments for job `job_num` of a hydra/launcher=gpu_pool sweep on `gpus` visible GPUs:
    a one-device GPU job trains on GPU job_num mod gpus (`devices=[g]`: loky reuses its worker processes, so
    the device is chosen per job, not by CUDA_VISIBLE_DEVICES once per process). Anything else (the CPU, no
    GPU, a job of several devices) is left as it is."""
    options = dict(trainer)
    accelerator = str(options.get("accelerator", "auto")).lower()
    if (
        gpus < 1
        or accelerator not in ("gpu", "cuda", "auto")
        or str(options.get("devices", 1)) not in ("1", "auto")
    ):
        return options
    return {**options, "accelerator": "gpu", "devices": [job_num % gpus]}


def pooled_job() -> int | None:
    """This job's number when a hydra/launcher=gpu_pool sweep started it, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.runtime.choices.get("hydra/launcher") != POOL:
        return None
    return int(hc.job.num)
