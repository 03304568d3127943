"""The test server's instance pool: the models it serves and the instances loaded from them.

Every load starts a llama-server child at the context length the load ends up with (the model's
configured limits decide: a larger load fails, or is clamped silently). An instance with a TTL
unloads once idle that long (`expire`, which listings and chat requests call first), and a model
asked for by name while none of its instances is loaded is loaded just in time, once however many
ask at once (`instance_for`, `get_or_load`). The REST router (server.py), the SDK protocol
(sdk_ws.py) and the stateful chats (stateful_chat.py) load, find and unload instances only through
these methods. What a model's GGUF file declares (`gguf_general`) is read here too, for the APIs
that list models.

An embedding model's llama-server runs with `--embeddings`, a physical batch as large as its
context (llama.cpp embeds an input in one batch) and, for a file that is not an encoder (a chat
model such as SmolLM2, which declares no pooling), mean pooling: the average of the hidden states
of the input's tokens, the usual sentence embedding of a decoder. An encoder's file declares its
own pooling, which llama.cpp applies.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..backends.catalog import llama_server_binary
from ..backends.local import LlamaServer
from ..errors import LmflowError
from .config import EMBEDDING_ARCHITECTURES, Behaviour, TestModel
from .refusals import Refusal

DEFAULT_CONTEXT = 4096
DEFAULT_PARALLEL = 4  # LM Studio 0.4's "Max Concurrent Predictions"
#: the llama.cpp load options of REST v1 a load gets unless it asks otherwise (LM Studio's defaults)
DEFAULT_OPTIONS: dict[str, Any] = {"eval_batch_size": 512, "flash_attention": True,
                                   "offload_kv_cache_to_gpu": True}


@functools.lru_cache(maxsize=32)
def gguf_general(path: Path) -> dict[str, str]:
    """The architecture and size label a GGUF file declares (none for a file that does not parse)."""
    wanted = {"general.architecture", "general.size_label"}
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by value type
    found: dict[str, str] = {}
    with open(path, "rb") as f:
        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(number("Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == 8:
                string()
            elif kind == 9:  # an array: item type, count, items
                item, count = number("I"), number("Q")
                for _ in range(count):
                    skip(item)
            else:
                f.seek(sizes[kind], os.SEEK_CUR)

        if f.read(4) != b"GGUF":
            return found
        f.seek(4 + 8, os.SEEK_CUR)  # version, tensor count
        try:
            for _ in range(number("Q")):  # the general.* keys come first: stop once both are read
                key, kind = string(), number("I")
                if key in wanted and kind == 8:
                    found[key] = string()
                    if len(found) == len(wanted):
                        break
                else:
                    skip(kind)
        except (struct.error, KeyError):  # truncated, or a value type newer than this reader
            pass
    return found


@dataclass
class Instance:
    """A loaded model: the llama-server that serves it and the sizes it got."""

    id: str
    model: TestModel
    context_length: int
    engine: LlamaServer
    load_seconds: float
    last_used: float = field(default_factory=time.monotonic)
    ttl_seconds: float | None = None  # set per load by the SDK (ttl)
    parallel: int = DEFAULT_PARALLEL  # llama-server slots (-np)
    #: the REST load options it got (what GET /api/v1/models reports in loaded_instances[].config)
    options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    #: loaded just in time (by a request that named its model, or the SDK's getOrLoad): with
    #: `jit_auto_evict`, the next just-in-time load unloads it
    jit: bool = False


def engine_args(asked: dict[str, Any]) -> tuple[str, ...]:
    """llama-server's flags for the REST v1 load options a load asked for; options it did not ask for
    keep llama-server's own defaults (so a plain load starts the engine as it always did), while the
    listing reports LM Studio's defaults for them."""
    args: list[str] = []
    if "eval_batch_size" in asked:
        args += ["-b", str(asked["eval_batch_size"])]
    if "flash_attention" in asked:
        args += ["-fa", "on" if asked["flash_attention"] else "off"]
    if asked.get("offload_kv_cache_to_gpu") is False:  # the KV cache stays in RAM on a CPU anyway
        args.append("-nkvo")
    return tuple(args)


def embedding_args(model: TestModel, context_length: int) -> tuple[str, ...]:
    """llama-server's flags for an embedding model (the module docstring says why)."""
    args = ["--embeddings", "-b", str(context_length), "-ub", str(context_length)]
    if gguf_general(model.path).get("general.architecture") not in EMBEDDING_ARCHITECTURES:
        args += ["--pooling", "mean"]
    return tuple(args)


class InstancePool:
    """The models served, by key, and the instances loaded from them, by id."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.models = {m.key: m for m in behaviour.models}
        self.instances: dict[str, Instance] = {}
        self._load_lock = asyncio.Lock()
        self._jit_lock = asyncio.Lock()  # concurrent first requests load a model once

    async def shutdown(self) -> None:
        """Stop every instance's llama-server."""
        for instance in list(self.instances.values()):
            await run_in_threadpool(instance.engine.stop)
        self.instances.clear()

    def loaded(self, key: str) -> list[Instance]:
        """The instances of model `key`."""
        return [i for i in self.instances.values() if i.model.key == key]

    def answering(self, asked: Any) -> Instance | None:
        """The instance that answers a request for `asked` (an instance id or a model key)."""
        if self.behaviour.ignore_model_field and self.instances:
            return next(iter(self.instances.values()))
        return self.instances.get(asked) or next(iter(self.loaded(asked)), None)

    async def load(self, key: str, context_length: int | None, *, identifier: str | None = None,
                   ttl_ms: int | None = None, parallel: int | None = None,
                   options: dict[str, Any] | None = None) -> Instance:
        """A new instance of model `key` (a llama-server started with `options`, REST v1's names)."""
        model = self.models.get(key)
        if model is None:
            raise Refusal(404, f"Model not found: {key}", kind="model_not_found", param="model")
        asked = context_length or min(DEFAULT_CONTEXT, model.max_context_length)
        if asked > model.max_context_length:
            raise Refusal(400, f"context_length {asked} exceeds the model's maximum "
                               f"{model.max_context_length}", param="context_length")
        actual = asked
        limit = model.loadable_context_length
        if limit is not None and asked > limit:
            if not model.clamp:
                raise Refusal(500, f"Failed to load model {key}: not enough memory for a context of "
                                   f"{asked} tokens")
            actual = limit  # silently, as LM Studio's auto-fit does
        asked_options = options or {}
        options = {**DEFAULT_OPTIONS, **asked_options}
        async with self._load_lock:
            count = len(self.loaded(key))
            instance_id = identifier or (key if count == 0 else f"{key}:{count + 1}")
            if identifier and identifier in self.instances:
                raise Refusal(409, f"a model instance with identifier {identifier!r} already exists")
            while instance_id in self.instances:
                count += 1
                instance_id = f"{key}:{count + 1}"
            parallel = parallel or DEFAULT_PARALLEL
            extra = engine_args(asked_options)
            if model.type == "embedding":
                extra += embedding_args(model, actual)
            if model.chat_template is not None:
                extra += ("--chat-template-file", str(model.chat_template))
            engine = LlamaServer(llama_server_binary(), model.path, key=key, context_length=actual,
                                 alias=instance_id.replace(":", "-"), parallel=parallel, extra_args=extra)
            started = time.monotonic()
            engine.launch()  # in the event loop's thread, which lives as long as the server
            try:
                await run_in_threadpool(engine.wait_ready)
            except LmflowError as exc:
                raise Refusal(500, f"Failed to load model {key}: {exc}") from None
            instance = Instance(instance_id, model, actual, engine, time.monotonic() - started,
                                ttl_seconds=ttl_ms / 1000 if ttl_ms else self.behaviour.ttl_seconds,
                                parallel=parallel, options=options)
            self.instances[instance_id] = instance
            return instance

    async def unload(self, instance_id: str) -> bool:
        """Stop the instance's llama-server; False if no instance has that id."""
        instance = self.instances.pop(instance_id, None)
        if instance is None:
            return False
        await run_in_threadpool(instance.engine.stop)
        return True

    async def expire(self) -> None:
        """Unload the instances idle for longer than their TTL."""
        now = time.monotonic()
        for instance in [i for i in self.instances.values()
                         if i.ttl_seconds is not None and now - i.last_used > i.ttl_seconds]:
            await self.unload(instance.id)

    async def get_or_load(self, find: Callable[[], Instance | None],
                          load: Callable[[], Awaitable[Instance]],
                          evicting: Callable[[Instance], Awaitable[None]] | None = None
                          ) -> tuple[Instance, bool]:
        """What `find()` finds, else what `load()` loads just in time (and True); one caller at a
        time, so that clients asking at once for one model load it once. With `jit_auto_evict`
        (LM Studio's "JIT models auto-evict"), the instances loaded just in time before are unloaded
        once it is loaded (a load that fails unloads nothing), each told to `evicting` before it goes."""
        async with self._jit_lock:
            found = find()
            if found is not None:
                return found, False
            earlier = [i for i in self.instances.values() if i.jit]
            instance = await load()
            instance.jit = True
            if self.behaviour.jit_auto_evict:
                for other in earlier:
                    if evicting is not None:
                        await evicting(other)
                    await self.unload(other.id)
            return instance, True

    async def instance_for(self, asked: Any, context_length: int | None = None, model_type: str = "llm"
                           ) -> tuple[Instance, float | None]:
        """The instance that answers for `asked` and, when it was loaded just in time for it (at
        `context_length`), the seconds that took; a model of another type than `model_type` (an
        embedding model asked for a chat) is refused."""
        named = isinstance(asked, str) and asked
        instance, load_seconds = self.answering(asked if named else None), None
        if instance is None:
            if not named:
                raise Refusal(400, "'model' is required", code="missing_required_parameter", param="model")
            if asked in self.models:
                _check_type(self.models[asked], asked, model_type)
            if not self.behaviour.jit:
                raise Refusal(404, f"Model {asked!r} is not loaded and JIT loading is off",
                              kind="model_not_found", param="model")
            instance, loaded_now = await self.get_or_load(lambda: self.answering(asked),
                                                          lambda: self.load(asked, context_length))
            if loaded_now:
                load_seconds = instance.load_seconds
        _check_type(instance.model, asked, model_type)
        instance.last_used = time.monotonic()
        return instance, load_seconds


_TYPE_NAMES = {"llm": "an LLM", "embedding": "an embedding model"}


def _check_type(model: TestModel, asked: Any, model_type: str) -> None:
    """Refuse a request for a model of another type (an embedding model asked for a chat)."""
    if model.type != model_type:
        raise Refusal(400, f"{asked!r} is {_TYPE_NAMES[model.type]}, not {_TYPE_NAMES[model_type]}",
                      code=f"model_not_{model_type}", param="model")
