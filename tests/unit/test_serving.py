"""Serving parts that need no Ray runtime, no engine and no network."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import numpy as np
import pytest
import torch

from services.serving import openai_api as oa
from services.serving.client import Generation, PolicyClient, sampling_dict
from services.serving.weights import (
    WeightError,
    WeightStore,
    pack_state_dict,
    pack_state_dict_array,
    stage_weights,
    unpack_state_dict,
)

# ---------------------------------------------------------------- packing


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(11, 4, generator=g)
    return {
        "embed.weight": emb,
        "lm_head.weight": emb,  # shares storage with embed (tied)
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "half": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4, generator=g)[::2],  # not contiguous
    }


def test_pack_roundtrip_exact_for_every_dtype_and_layout():
    sd = _state()
    out = unpack_state_dict(pack_state_dict(sd))
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k


def test_packed_bytes_are_read_by_the_reference_safetensors_parser(tmp_path):
    from safetensors import safe_open

    sd = _state()
    folder = stage_weights(pack_state_dict_array(sd, metadata={"version": "3"}), tmp_path / "w")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"version": "3"}
        assert set(f.keys()) == set(sd)
        assert torch.equal(f.get_tensor("bf16"), sd["bf16"])
    n = struct.unpack("<Q", (folder / "model.safetensors").read_bytes()[:8])[0]
    assert n % 8 == 0  # data section stays aligned


def test_pack_reuses_its_buffer_only_when_it_fits():
    sd = _state()
    first = pack_state_dict_array(sd)
    changed = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    second = pack_state_dict_array(changed, out=first)
    assert second is first  # same shapes: written in place
    assert second.tobytes() == pack_state_dict_array(changed).tobytes()
    assert torch.equal(unpack_state_dict(second)["bf16"], changed["bf16"])
    grown = {**sd, "extra": torch.ones(3)}
    third = pack_state_dict_array(grown, out=first)
    assert third is not first and set(unpack_state_dict(third)) == set(grown)  # other size: a new buffer
    assert pack_state_dict_array(sd, out=np.zeros(first.size, np.float32)).dtype == np.uint8  # wrong dtype: new
    frozen = pack_state_dict_array(sd)
    frozen.flags.writeable = False
    assert pack_state_dict_array(sd, out=frozen) is not frozen


def test_client_packing_buffer_is_not_shipped_with_the_client():
    import copy
    import pickle

    client = PolicyClient("http://127.0.0.1:1")
    client._pack_out = np.zeros(1 << 20, np.uint8)
    assert copy.copy(client)._pack_out is None
    assert len(pickle.dumps(client)) < 100_000
    assert client._pack_out is not None  # the original keeps it


def test_pack_rejects_non_tensors_and_unpack_rejects_garbage():
    with pytest.raises(WeightError, match="not a tensor"):
        pack_state_dict({"a": [1, 2]})
    with pytest.raises(WeightError, match="too short"):
        unpack_state_dict(b"abc")
    bad_header = struct.pack("<Q", 5) + b"{nope"
    with pytest.raises(WeightError, match="not a valid safetensors"):
        unpack_state_dict(bad_header)
    good = bytearray(pack_state_dict({"x": torch.ones(4)}))
    with pytest.raises(WeightError):
        unpack_state_dict(bytes(good[:-3]))  # truncated data


def test_pack_is_not_pickle():
    raw = pack_state_dict({"x": torch.ones(2)})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    assert header["x"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert np.frombuffer(raw[8 + n:], dtype=np.float32).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------- WeightStore


def test_store_versions_only_increase():
    store = WeightStore()
    assert store.latest() == (0, None)
    store.publish(1, [b"payload-1"])
    with pytest.raises(WeightError, match="> 1"):
        store.publish(1, [b"again"])
    with pytest.raises(WeightError):
        store.publish(True, [b"x"])
    with pytest.raises(WeightError, match="one-element list"):
        store.publish(2, b"x")
    assert store.latest() == (1, [b"payload-1"])


def test_store_long_poll_wakes_on_publish_and_times_out_otherwise():
    async def scenario():
        store = WeightStore()
        assert await store.wait_newer(0, timeout_s=0.05) == (0, None)
        waiter = asyncio.ensure_future(store.wait_newer(0, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        store.publish(1, [b"w1"])
        assert await asyncio.wait_for(waiter, 1.0) == (1, [b"w1"])
        assert await store.wait_newer(0, timeout_s=0.01) == (1, [b"w1"])  # already newer: no wait
        assert await store.wait_newer(1, timeout_s=0.01) == (1, None)

    asyncio.run(scenario())


def test_store_tracks_live_replicas(monkeypatch):
    import services.serving.weights as w

    now = [1000.0]
    monkeypatch.setattr(w.time, "time", lambda: now[0])
    store = WeightStore(stale_after_s=5.0)
    store.report("a", 1)
    now[0] += 3
    store.report("b", 2)
    assert store.replicas() == {"a": 1, "b": 2}
    now[0] += 3  # a last seen 6 s ago
    assert store.replicas() == {"b": 2}
    assert store.replicas(live_only=False) == {"a": 1, "b": 2}
    store.forget("b")
    assert store.replicas(live_only=False) == {"a": 1}


# ---------------------------------------------------------------- OpenAI shapes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from services.serving.tiny_model import DEFAULT_CORPUS, build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tok"), DEFAULT_CORPUS * 5, vocab_size=512,
                            hidden=16, layers=1, heads=2, intermediate=32)
    return AutoTokenizer.from_pretrained(str(path))


def test_parse_completion_prompt_forms(tokenizer):
    req = oa.parse_completion({"prompt": "open fridge", "n": 2, "logprobs": 0, "max_tokens": 5}, tokenizer, 16)
    ids = tokenizer("open fridge", add_special_tokens=False)["input_ids"]
    assert req.prompts == [ids, ids] and req.want_logprobs and req.sampling["max_tokens"] == 5
    assert oa.parse_completion({"prompt": [1, 2, 3]}, tokenizer, 16).prompts == [[1, 2, 3]]
    assert oa.parse_completion({"prompt": [[1, 2], [3]]}, tokenizer, 16).prompts == [[1, 2], [3]]
    req = oa.parse_completion({"prompt": "x", "session_id": "ep-1", "min_policy_version": 4}, tokenizer, 16)
    assert (req.session_id, req.min_version, req.want_logprobs) == ("ep-1", 4, False)
    assert oa.parse_completion({"prompt": "x"}, tokenizer, 16, {"x-session-id": "h"}).session_id == "h"


@pytest.mark.parametrize("body, match", [
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "n": 0}, "'n'"),
    ({"prompt": "x", "max_tokens": "9"}, "max_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1], "a", 3]}, "prompt"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "min_policy_version": "2"}, "min_policy_version"),
])
def test_parse_completion_rejects_with_clear_messages(tokenizer, body, match):
    with pytest.raises(oa.RequestError, match=match):
        oa.parse_completion(body, tokenizer, 16)


def test_parse_chat_uses_the_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "look around"}]
    req = oa.parse_chat({"messages": msgs, "max_completion_tokens": 7, "logprobs": True}, tokenizer, 16)
    text = tokenizer.decode(req.prompts[0])
    assert text.startswith("<|im_start|>user\nlook around<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert req.sampling["max_tokens"] == 7 and req.want_logprobs
    with pytest.raises(oa.RequestError, match="messages"):
        oa.parse_chat({"messages": []}, tokenizer, 16)
    with pytest.raises(oa.RequestError, match="content"):
        oa.parse_chat({"messages": [{"role": "user"}]}, tokenizer, 16)


def _result(version, ids=(5, 6)):
    return {"token_ids": list(ids), "logprobs": [-0.5] * len(ids), "text": "ab", "finish_reason": "length",
            "policy_version": version, "swap_aborted": False, "prompt_tokens": 3}


def test_responses_carry_versions_token_ids_and_logprobs(tokenizer):
    req = oa.parse_completion({"prompt": [1, 2, 3], "logprobs": 0, "n": 2}, tokenizer, 16)
    out = oa.format_completion(req, [_result(3), _result(4)], tokenizer, "m")
    assert out["policy_version"] == 3  # the oldest version that produced any choice
    assert [c["policy_version"] for c in out["choices"]] == [3, 4]
    assert out["choices"][0]["token_ids"] == [5, 6]
    assert out["choices"][0]["logprobs"]["token_logprobs"] == [-0.5, -0.5]
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    chat_req = oa.parse_chat({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, tokenizer, 16)
    chat = oa.format_chat(chat_req, [_result(2)], tokenizer, "m")
    assert [c["logprob"] for c in chat["choices"][0]["logprobs"]["content"]] == [-0.5, -0.5]
    no_lp = oa.format_completion(oa.parse_completion({"prompt": [1]}, tokenizer, 16), [_result(1)], tokenizer, "m")
    assert no_lp["choices"][0]["logprobs"] is None


# ---------------------------------------------------------------- router, client helpers


def test_rendezvous_routing_is_stable_and_moves_few_sessions():
    from services.serving.router import rendezvous_order

    sessions = [f"ep-{i}" for i in range(400)]
    two = {s: rendezvous_order(s, ["r1", "r2"])[0] for s in sessions}
    assert two == {s: rendezvous_order(s, ["r2", "r1"])[0] for s in sessions}  # order-independent
    assert 120 < sum(v == "r1" for v in two.values()) < 280  # spread over both
    three = {s: rendezvous_order(s, ["r1", "r2", "r3"])[0] for s in sessions}
    moved = [s for s in sessions if three[s] != two[s]]
    assert all(three[s] == "r3" for s in moved)  # only sessions taken by the new replica move
    assert 60 < len(moved) < 220


def test_client_helpers():
    from services.config import SamplingConfig

    cfg = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=12, eval_temperature=0.0)
    assert sampling_dict(cfg) == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 12}
    assert sampling_dict(cfg, greedy=True)["temperature"] == 0.0
    g = Generation.from_result(_result(5))
    assert (g.token_ids, g.policy_version, g.swap_aborted) == ([5, 6], 5, False)
    with pytest.raises(TypeError, match="PolicyClient target"):
        PolicyClient(object())
    http = PolicyClient("http://127.0.0.1:1/")
    assert http.mode == "http" and http.base_url == "http://127.0.0.1:1"
    with pytest.raises(RuntimeError, match="cannot publish"):
        http.publish_weights({"x": torch.ones(1)}, 1)
    with pytest.raises(TypeError):
        http.generate([1, 2], {})


# ---------------------------------------------------------------- engine environment


def test_cpu_engine_env_bounds_the_onednn_primitive_cache(monkeypatch):
    """The CPU worker inherits these at spawn; an unbounded (1024) primitive cache grew it ~0.5 GB in a soak."""
    from services.config import ConfigError, ServingConfig, TrainConfig, validate
    from services.serving.engine import cpu_engine_env

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu_engine_env(ServingConfig(kv_cache_gib=2, onednn_cache_capacity=16))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    cfg = TrainConfig()
    cfg.serving.onednn_cache_capacity = -1
    with pytest.raises(ConfigError, match="onednn_cache_capacity"):
        validate(cfg)


def test_memory_trace_names_the_sites_that_grew():
    from services.config import ModelConfig, ServingConfig
    from services.serving.server import PolicyServer

    server = PolicyServer(ModelConfig(), ServingConfig(), engine=object())  # memory_trace never touches the engine
    with pytest.raises(ValueError, match="needs 'start' first"):
        server.memory_trace("diff")
    server.memory_trace("start")
    try:
        kept = [bytes(1000) + bytes([i % 256]) for i in range(2000)]  # ~2 MB that stays alive
        top = server.memory_trace("diff", 5)
    finally:
        server.memory_trace("stop")
    assert kept and len(top) <= 5
    assert "test_serving.py" in top[0] and float(top[0].split()[0]) > 1500  # KiB, the biggest grower


def test_staging_rewrites_the_previous_file_in_place(tmp_path):
    big = pack_state_dict_array({"w": torch.arange(4096, dtype=torch.float32)})
    small = pack_state_dict_array({"w": torch.arange(16, dtype=torch.float32)})
    folder = tmp_path / "w"
    stage_weights(big, folder)
    inode = (folder / "model.safetensors").stat().st_ino
    stage_weights(small.tobytes(), folder)  # bytes as well as arrays
    f = folder / "model.safetensors"
    assert f.stat().st_ino == inode  # the same file, so its pages are reused
    assert f.read_bytes() == small.tobytes()  # truncated: nothing of the bigger payload is left
    assert torch.equal(unpack_state_dict(f.read_bytes())["w"], torch.arange(16, dtype=torch.float32))
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    (folder / "model.safetensors.tmp").write_bytes(b"partial write of a crashed stage")
    stage_weights(big, folder)  # a leftover temporary file is overwritten; the last whole payload stays until then
    assert f.read_bytes() == big.tobytes() and sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]


def test_protocol_tags_are_one_token_each_and_survive_detokenization(tokenizer):
    """An answer's tags cost one decode step each, and the engine's text (special tokens skipped) keeps them."""
    from services.envs.protocol import format_response, parse_action
    from services.serving.tiny_model import PROTOCOL_TOKENS

    for tag in PROTOCOL_TOKENS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    answer = format_response("take red apple")
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 + len(tokenizer("take red apple", add_special_tokens=False)["input_ids"])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == answer and parse_action(text, 100).action == "take red apple"
    assert "".join(tokenizer.decode([i]) for i in ids) == answer  # piece by piece, as a streaming detokenizer sees it
