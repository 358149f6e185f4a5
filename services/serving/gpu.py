"""GPU path (issue 4, item 7): weights from the learner's GPU to the replica's GPU over NCCL.

On CUDA machines the replica runs the CUDA build of vLLM (same ``VLLMEngine``,
``tensor_parallel_size`` and ``num_gpus`` from ServingConfig) with
``weight_transfer_config={"backend": "nccl"}``. Instead of packing and staging
a file, the learner drives vLLM's weight-transfer API: its trainer engine opens
NCCL rank 0 and broadcasts every tensor while the replica's workers receive
them in place (``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``). Our part is the glue: a client
that forwards those four calls to the replica through its Serve handle, and the
replica side (``PolicyServer.weight_sync``) that closes the admission gate and
drains in-flight requests around the update, exactly like the CPU swap, so
versions stay honest.

Limits (not verified here: this machine and CI have no GPU): one replica per
NCCL group (a Serve handle call reaches one replica; several replicas need one
group each or a group over all of them), and the learner and the replica must
see each other's ``master_address``. The CPU path (object store + in-place
reload) works everywhere and stays the fallback.
"""

from __future__ import annotations

import time
from typing import Any


def nccl_engine_kwargs() -> dict[str, Any]:
    """Extra AsyncEngineArgs for a replica that receives weights over NCCL."""
    return {"weight_transfer_config": {"backend": "nccl"}}


class ServeSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol, forwarded to one replica via a Serve handle."""

    def __init__(self, handle: Any, version: int, timeout_s: float = 600.0) -> None:
        self.handle = handle
        self.version = version
        self.timeout_s = timeout_s

    def _call(self, op: str, payload: Any = None) -> Any:
        return self.handle.weight_sync.remote(op, payload, self.version).result(timeout_s=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init", init_info)

    def start_weight_update(self) -> None:
        self._call("start")

    def update_weights(self, update_info: Any) -> None:
        self._call("update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish")


class NcclPublisher:
    """Learner side: one NCCL group with one replica; ``publish(module, version)`` per update."""

    def __init__(self, handle: Any, master_address: str, master_port: int, replica_world_size: int) -> None:
        self.handle = handle
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = 1 + replica_world_size  # trainer rank 0 + the replica's TP workers
        self._engine: Any = None

    def publish(self, module: Any, version: int) -> float:
        """Broadcast ``module``'s weights as ``version``; returns seconds taken."""
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        t0 = time.perf_counter()
        client = ServeSyncClient(self.handle, version)
        source = ModuleSource(module)
        if self._engine is None:
            info = NCCLTrainerInitInfo(master_address=self.master_address, master_port=self.master_port,
                                       world_size=self.world_size)
            self._engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
        else:
            self._engine.client, self._engine.source = client, source
        self._engine.send_weights()
        return time.perf_counter() - t0


async def replica_weight_sync(server: Any, op: str, payload: Any, version: int) -> dict[str, Any]:
    """Replica side of one NCCL step (called by ``PolicyServer.weight_sync``)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

    llm = server.engine.raw
    if op == "init":
        await llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=dict(payload)))
    elif op == "start":
        await server.begin_swap()
        await llm.start_weight_update()
    elif op == "update":
        await llm.update_weights(WeightTransferUpdateRequest(update_info=payload))
    elif op == "finish":
        try:
            await llm.finish_weight_update(weight_version=str(version))
        finally:
            await server.end_swap(version)
    else:
        raise ValueError(f"unknown weight_sync op {op!r}")
    return {"op": op, "version": server.version}
