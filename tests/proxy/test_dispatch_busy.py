"""The dispatcher counts the calls under way per model, from the first attempt to the answer's last
byte: what a local model's restart waits for before it stops the server answering them."""
from __future__ import annotations

import asyncio
import gc

import pytest
import yaml

from proxy.cooldown import Cooldowns
from proxy.dispatch import Call, RetryingDispatcher
from proxy.errors import AllUpstreamsFailed, UpstreamTransient
from proxy.providers import ProviderRegistry
from proxy.upstream import Answer


class StubPassThrough:
    """Answers every attempt with ``make()``'s answer (or raises it), noting how busy the model
    was while it answered."""

    def __init__(self, make):
        self.make, self.seen, self.closed = make, [], []

    async def attempt(self, d, body, stream, first_byte_s, timeout_s, redact, connect_s=None, sent=None):
        self.seen.append(self.dispatcher.busy(d.name))
        result = self.make(self)
        if isinstance(result, Exception):
            raise result
        return result

    async def close(self):
        pass


def _chunks(stub, n=3):
    async def gen():
        try:
            for i in range(n):
                yield f"data: {i}\n\n".encode()
        finally:
            stub.closed.append(True)
    return Answer(chunks=gen())


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "m", "litellm_params": {"model": "openai/up-m", "api_base": "http://x/v1"}}],
        "router_settings": {"num_retries": 0}}))
    registry = ProviderRegistry(path, dict)
    return registry.snapshot


def _dispatcher(make):
    stub = StubPassThrough(make)
    dispatcher = RetryingDispatcher(Cooldowns(), passthrough=stub)
    stub.dispatcher = dispatcher
    return dispatcher, stub


def _call(snap, stream):
    return Call(targets=[snap.models["m"]], body={"model": "m", "messages": []}, stream=stream,
                router=snap.router)


async def test_a_whole_answer_is_counted_while_it_is_asked_for_only(model):
    dispatcher, stub = _dispatcher(lambda s: Answer(body=b"{}"))
    reply = await dispatcher.complete(_call(model, stream=False))
    assert reply.body == b"{}" and stub.seen == [1]
    assert dispatcher.busy("m") == 0 and "m" not in dispatcher._busy  # no entry left per name


async def test_a_stream_is_counted_until_its_last_chunk(model):
    dispatcher, stub = _dispatcher(_chunks)
    reply = await dispatcher.complete(_call(model, stream=True))
    assert dispatcher.busy("m") == 1
    received = [chunk async for chunk in reply.chunks]
    assert len(received) == 3 and stub.closed == [True]
    assert dispatcher.busy("m") == 0 and "m" not in dispatcher._busy


async def test_a_stream_closed_early_is_released_and_closes_the_upstream_s(model):
    dispatcher, stub = _dispatcher(_chunks)
    reply = await dispatcher.complete(_call(model, stream=True))
    assert await reply.chunks.__anext__() == b"data: 0\n\n"
    await reply.chunks.aclose()
    assert dispatcher.busy("m") == 0 and stub.closed == [True]


async def test_a_stream_dropped_unread_is_released(model):
    """The client left between the answer and the first chunk: nobody iterates or closes it."""
    dispatcher, _ = _dispatcher(_chunks)
    reply = await dispatcher.complete(_call(model, stream=True))
    assert dispatcher.busy("m") == 1
    del reply
    gc.collect()
    assert dispatcher.busy("m") == 0


async def test_a_stream_whose_reader_is_cancelled_is_released(model):
    gate = asyncio.Event()

    def slow(stub):
        async def gen():
            yield b"data: 0\n\n"
            await gate.wait()
            yield b"data: 1\n\n"
        return Answer(chunks=gen())

    dispatcher, _ = _dispatcher(slow)
    reply = await dispatcher.complete(_call(model, stream=True))

    async def read():
        async for _ in reply.chunks:
            pass

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    assert dispatcher.busy("m") == 1
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert dispatcher.busy("m") == 0


async def test_a_failed_call_is_released(model):
    dispatcher, stub = _dispatcher(lambda s: UpstreamTransient("boom", model="m", status=503))
    with pytest.raises(AllUpstreamsFailed):
        await dispatcher.complete(_call(model, stream=False))
    assert stub.seen == [1] and dispatcher.busy("m") == 0
