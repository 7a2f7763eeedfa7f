"""A fresh process for every device round, forked from a clean server.

`RoundServer()` starts `python -m llmprune.fedrecover.round_server`: a single-threaded process that
imports the training stack (torch, transformers, peft, this package) once and then, per job, forks
a child that runs `device.run_round` and exits. Every round therefore starts from the same process
image — a plain Python with the training stack, like a device's own process — and never sees what an
earlier round (another simulated device) left in memory. Split training's jobs (split_device.py) run in
a session: one forked child per device that keeps the device's part of the model loaded from the
round's first job to its last, as the device does, and then exits. The server, unlike multiprocessing's
forkserver, never imports the caller's main module (a Ray worker's), and it ends when its caller
closes the pipe or dies.

Messages on the pipes are length-prefixed: a JSON header (the instruction, settings, losses) and
the tensors (adapter, windows) as safetensors bytes — nothing is pickled."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass

_LENGTH = struct.Struct("<Q")


def _write(fd: int, header: dict, tensors: dict) -> None:
    from safetensors.numpy import save

    header = {**header, "order": list(tensors)}     # safetensors sorts the names: the order travels apart
    head, blob = json.dumps(header).encode(), save(tensors) if tensors else b""
    view = memoryview(_LENGTH.pack(len(head)) + head + _LENGTH.pack(len(blob)) + blob)
    while view:
        view = view[os.write(fd, view):]


def _read(fd: int) -> tuple[dict, dict]:
    """The next (header, tensors) on `fd`; EOFError when the other side closed it."""
    from safetensors.numpy import load

    header = json.loads(_read_exactly(fd, _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))[0]))
    blob = _read_exactly(fd, _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))[0])
    tensors = load(blob) if blob else {}
    return header, {name: tensors[name] for name in header.pop("order")}


def encode_job(job) -> tuple[dict, dict]:
    """A RoundJob as a JSON header and named arrays (the adapter under `a/`, the windows)."""
    instruction, tensors = _encode_instruction(job.instruction)
    header = {"path": job.path, "instruction": instruction, "dropout": job.dropout, "teacher": job.teacher,
              "emulation": _encode_emulation(job.emulation)}
    return header, {**{f"a/{k}": v for k, v in job.arrays.items()}, "windows": job.windows.numpy(), **tensors}


def decode_job(header: dict, tensors: dict):
    import torch

    from .device import RoundJob

    arrays = {k[2:]: v for k, v in tensors.items() if k.startswith("a/")}
    return RoundJob(header["path"], _decode_instruction(header, tensors), arrays,
                    torch.from_numpy(tensors["windows"]), header["dropout"], _decode_emulation(header),
                    header["teacher"])


def encode_split_job(job) -> tuple[dict, dict]:
    """A split_device.SplitJob: the device's state under `s/`, the windows, the incoming tensor."""
    instruction, tensors = _encode_instruction(job.instruction)
    header = {"kind": "split-step", "job": job.kind, "path": job.path, "instruction": instruction, "step": job.step,
              "emulation": _encode_emulation(job.emulation)}
    tensors.update({f"s/{k}": v for k, v in job.state.items()})
    tensors["windows"] = job.windows.numpy()
    if job.incoming is not None:
        tensors["incoming"] = job.incoming
    return header, tensors


def decode_split_job(header: dict, tensors: dict):
    import torch

    from .split_device import SplitJob

    state = {k[2:]: v for k, v in tensors.items() if k.startswith("s/")}
    return SplitJob(header["job"], header["path"], _decode_instruction(header, tensors), state,
                    torch.from_numpy(tensors["windows"]), header["step"], tensors.get("incoming"),
                    _decode_emulation(header))


def _encode_instruction(instruction) -> tuple[dict, dict]:
    import numpy as np

    config = instruction.to_config()
    vocabulary = config.pop("vocabulary", None)      # bytes: a tensor, not JSON
    return config, ({} if vocabulary is None else {"vocabulary": np.frombuffer(vocabulary, dtype=np.uint8)})


def _decode_instruction(header: dict, tensors: dict):
    from .messages import TrainInstruction

    config = dict(header["instruction"])
    if "vocabulary" in tensors:
        config["vocabulary"] = tensors["vocabulary"].tobytes()
    return TrainInstruction.from_config(config)


def _encode_emulation(emulation) -> list | None:
    return None if emulation is None else [emulation.speed, emulation.oom_mb, emulation.baseline_mb]


def _decode_emulation(header: dict):
    from .device import DeviceEmulation

    return None if header["emulation"] is None else DeviceEmulation(*header["emulation"])


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the pipe was closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class RoundServer:
    """The caller's side: start the server once, then `run(job)` per round (see device.RoundJob)."""

    def __init__(self) -> None:
        job_read, self._job_write = os.pipe()
        self._result_read, result_write = os.pipe()
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(job_read), str(result_write)],
                                        pass_fds=(job_read, result_write), stdin=subprocess.DEVNULL)
        os.close(job_read)
        os.close(result_write)

    def run(self, job):
        """The job's RoundResult; its exception re-raised here (a MemoryError stays one)."""
        from .device import RoundResult

        header, trained = self._call(*encode_job(job))
        return RoundResult(trained, header["loss"], header["memory"])

    def run_split(self, job, session: str):
        """A split training job's SplitResult (split_device.py), run in the device's session (`session`
        names the device: its child holds the device's part of the model until its round's last job)."""
        from .split_device import SplitResult

        header, tensors = encode_split_job(job)
        header, tensors = self._call({**header, "session": session}, tensors)
        state = {k[2:]: v for k, v in tensors.items() if k.startswith("s/")}
        return SplitResult(state, tensors.get("outgoing"), header["loss"], header["seconds"], header["peak"])

    def _call(self, header: dict, tensors: dict) -> tuple[dict, dict]:
        try:
            _write(self._job_write, header, tensors)
            header, tensors = _read(self._result_read)
        except (BrokenPipeError, EOFError):
            code = self.process.poll()
            raise RuntimeError(f"the device's round server died (exit code {code})") from None
        if header["status"] == "ok":
            return header, tensors
        if header["name"] == "MemoryError":
            raise MemoryError(header["message"])
        raise RuntimeError(f"{header['name']}: {header['message']}\n{header['trace']}")

    def close(self) -> None:
        for fd in (self._job_write, self._result_read):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> RoundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MAX_SESSIONS = 16      # devices whose round is under way on this server (one that vanished mid-round lingers)


@dataclass
class _Session:
    """A device's child in split training, and the server's ends of its two pipes."""

    pid: int
    job_write: int
    result_read: int

    def close(self) -> int:
        for fd in (self.job_write, self.result_read):
            os.close(fd)
        return os.waitpid(self.pid, 0)[1]


def _serve(job_fd: int, result_fd: int) -> None:
    """The server: per job, fork a child that runs it and sends its result through a pipe of its
    own (a split job goes to its device's session, started at need); the server forwards the
    result, or says how the child died. Ctrl-C is its caller's to handle (a terminal sends it to the
    whole process group): the server and its children ignore it and end when the caller goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sessions: dict[str, _Session] = {}
    while True:
        try:
            job = _read(job_fd)
        except EOFError:
            return
        key = job[0].pop("session", None)
        result = _run_once(job, (job_fd, result_fd)) if key is None else _run_in_session(job, key, sessions,
                                                                                          (job_fd, result_fd))
        _write(result_fd, *result)


def _run_once(job: tuple[dict, dict], server_fds: tuple[int, int]) -> tuple[dict, dict]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        _close(read, *server_fds)
        _child(job, write)
    os.close(write)
    try:
        result = _read(read)
    except EOFError:
        result = None
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return result if result is not None else _died(status)


def _run_in_session(job: tuple[dict, dict], key: str, sessions: dict[str, _Session],
                    server_fds: tuple[int, int]) -> tuple[dict, dict]:
    """The job's result from the device's session; a session whose device's round is over (its child
    said so) or that died is closed, and the oldest are closed past _MAX_SESSIONS."""
    session = sessions.pop(key, None) or _start_session(sessions, server_fds)
    try:
        _write(session.job_write, *job)
        result = _read(session.result_read)
    except (BrokenPipeError, EOFError):
        result = None
    if result is None or result[0].pop("session_over"):
        status = session.close()
        return result if result is not None else _died(status)
    sessions[key] = session                     # the most recent last
    while len(sessions) > _MAX_SESSIONS:
        sessions.pop(next(iter(sessions))).close()
    return result


def _start_session(sessions: dict[str, _Session], server_fds: tuple[int, int]) -> _Session:
    job_read, job_write = os.pipe()
    result_read, result_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        # the child keeps only its own pipe ends: a session must see EOF when the server goes
        _close(job_write, result_read, *server_fds,
               *(fd for other in sessions.values() for fd in (other.job_write, other.result_read)))
        _session(job_read, result_write)
    os.close(job_read)
    os.close(result_write)
    return _Session(pid, job_write, result_read)


def _session(job_fd: int, result_fd: int) -> None:
    """A device's split jobs, one after another, until its round ends (the part is released) or the
    server goes."""
    from .split_device import holds_part

    while True:
        try:
            job = _read(job_fd)
        except EOFError:
            os._exit(0)
        outcome = _outcome(job)
        over = not holds_part()
        outcome[0]["session_over"] = over
        try:
            _write(result_fd, *outcome)
        except BaseException:  # noqa: BLE001 - nothing to tell it with: the server reports the death
            os._exit(1)
        if over:
            os._exit(0)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _died(status: int) -> tuple[dict, dict]:
    return ({"status": "error", "name": "RuntimeError", "trace": "",
             "message": f"the round process died ({_how(status)})"}, {})


def _round_outcome(job: tuple[dict, dict]) -> tuple[dict, dict]:
    from .device import run_round

    result = run_round(decode_job(*job))
    return {"status": "ok", "loss": result.loss, "memory": result.memory}, result.trained


def _split_outcome(job: tuple[dict, dict]) -> tuple[dict, dict]:
    from .split_device import run_split_job

    result = run_split_job(decode_split_job(*job))
    tensors = {f"s/{k}": v for k, v in result.state.items()}
    if result.outgoing is not None:
        tensors["outgoing"] = result.outgoing
    return {"status": "ok", "loss": result.loss, "seconds": result.seconds, "peak": result.peak_rss_mb}, tensors


def _outcome(job: tuple[dict, dict]) -> tuple[dict, dict]:
    try:
        return _split_outcome(job) if job[0].get("kind") == "split-step" else _round_outcome(job)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller as it happened
        return ({"status": "error", "name": type(exc).__name__, "message": str(exc),
                 "trace": traceback.format_exc()}, {})


def _child(job: tuple[dict, dict], write: int) -> None:
    code = 0
    outcome = _outcome(job)
    try:
        _write(write, *outcome)
    except BaseException:  # noqa: BLE001 - nothing to tell it with: the server reports the death
        code = 1
    os._exit(code)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _preload() -> None:
    """The training stack, imported once before any fork: every round's process starts with it
    (peft alone takes seconds to import; a round would pay that again otherwise)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import llmprune.fedrecover.client_model  # noqa: F401
    import llmprune.fedrecover.device  # noqa: F401
    import llmprune.fedrecover.policies  # noqa: F401  (the device-model kinds a policy registers)
    import llmprune.fedrecover.split_device  # noqa: F401
    import llmprune.fedrecover.task  # noqa: F401


if __name__ == "__main__":
    _preload()
    _serve(int(sys.argv[1]), int(sys.argv[2]))
