"""A fresh process for every device round, forked from a clean server.

`RoundServer()` starts `python -m llmprune.fedrecover.round_server`: a single-threaded process that
imports the training stack (torch, transformers, peft, this package) once and then, per job, forks
a child that runs `device.run_round` and exits. Every round therefore starts from the same process
image — a plain Python with the training stack, like a device's own process — and never sees what
an earlier round (another simulated device) left in memory. The server, unlike multiprocessing's
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
    import numpy as np

    emulation = job.emulation
    instruction = job.instruction.to_config()
    vocabulary = instruction.pop("vocabulary", None)      # bytes: a tensor, not JSON
    tensors = {} if vocabulary is None else {"vocabulary": np.frombuffer(vocabulary, dtype=np.uint8)}
    header = {"path": job.path, "instruction": instruction, "dropout": job.dropout, "teacher": job.teacher,
              "emulation": None if emulation is None else [emulation.speed, emulation.oom_mb, emulation.baseline_mb]}
    return header, {**{f"a/{k}": v for k, v in job.arrays.items()}, "windows": job.windows.numpy(), **tensors}


def decode_job(header: dict, tensors: dict):
    import torch

    from .device import DeviceEmulation, RoundJob
    from .messages import TrainInstruction

    emulation = None if header["emulation"] is None else DeviceEmulation(*header["emulation"])
    arrays = {k[2:]: v for k, v in tensors.items() if k.startswith("a/")}
    instruction = dict(header["instruction"])
    if "vocabulary" in tensors:
        instruction["vocabulary"] = tensors["vocabulary"].tobytes()
    return RoundJob(header["path"], TrainInstruction.from_config(instruction), arrays,
                    torch.from_numpy(tensors["windows"]), header["dropout"], emulation,
                    header["teacher"])


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

        try:
            _write(self._job_write, *encode_job(job))
            header, trained = _read(self._result_read)
        except (BrokenPipeError, EOFError):
            code = self.process.poll()
            raise RuntimeError(f"the device's round server died (exit code {code})") from None
        if header["status"] == "ok":
            return RoundResult(trained, header["loss"], header["memory"])
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


def _serve(job_fd: int, result_fd: int) -> None:
    """The server: per job, fork a child that runs it and sends its result through a pipe of its
    own; the server forwards the result, or says how the child died. Ctrl-C is its caller's to
    handle (a terminal sends it to the whole process group): the server and its children ignore it
    and end when the caller goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = _read(job_fd)
        except EOFError:
            return
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(job, write)
        os.close(write)
        try:
            result = _read(read)
        except EOFError:
            result = None
        os.close(read)
        _, status = os.waitpid(pid, 0)
        if result is None:
            result = ({"status": "error", "name": "RuntimeError", "trace": "",
                       "message": f"the round process died ({_how(status)})"}, {})
        _write(result_fd, *result)


def _child(job: tuple[dict, dict], write: int) -> None:
    from .device import run_round

    code = 0
    try:
        result = run_round(decode_job(*job))
        outcome = ({"status": "ok", "loss": result.loss, "memory": result.memory}, result.trained)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller as it happened
        outcome = ({"status": "error", "name": type(exc).__name__, "message": str(exc),
                    "trace": traceback.format_exc()}, {})
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
    import llmprune.fedrecover.task  # noqa: F401


if __name__ == "__main__":
    _preload()
    _serve(int(sys.argv[1]), int(sys.argv[2]))
