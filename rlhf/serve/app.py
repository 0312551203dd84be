"""The policy as an OpenAI-compatible Ray Serve application, with feedback into the database.

    rlhf serve configs/tiny_cpu.yaml --model runs/tiny_cpu/rl/model     # prints URL and token
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/v1/chat/completions \
        -d '{"messages": [{"role": "user", "content": "12+34="}], "max_tokens": 8}'

Routes: POST /v1/chat/completions and /v1/completions (`"stream": true` answers as server-sent
events), POST /v1/feedback, GET /v1/models, and GET /health, the only one without the bearer token.
Every answer carries `response_id` (what feedback refers to) and `model_version`; every prompt
and answer is logged in the database before the answer's last byte is sent.

Each replica owns one in-process vLLM engine (`actors.rollout.RolloutEngine`, token ids in and
out; Ray Serve's own LLM deployments import vLLM themselves and expect accelerators). Concurrent
requests are batched into one engine call (`serve.batch`); the engine runs on one thread of its
own, so the event loop keeps answering health checks and feedback while it generates. Streaming
generates `serve.stream_chunk_tokens` tokens at a time, each chunk continuing the token ids so far
(the prefix cache makes the re-read cheap). The served model and the database come from the
deployment's `user_config` ({model_path, model_version, database_url}): a new model is loaded by
`reconfigure` on the engine thread, between batches, so a later `rlhf deploy` can swap versions
without dropping a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from rlhf.serve.db import FeedbackConflict, FeedbackStore
from rlhf.serve.protocol import (
    GenerationRequest,
    RequestError,
    check_references,
    parse_body,
    parse_feedback,
    parse_generation,
)

logger = logging.getLogger("ray.serve")  # lands in the replica logs
api = FastAPI(title="rlhf policy server", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass
class GenItem:
    """One engine request inside a batch."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    kind = {401: "unauthorized", 409: "conflict", 413: "too_large"}.get(status, "invalid_request")
    if status >= 500:
        kind = "server_error"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": kind, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment
@serve.ingress(api)
class PolicyServer:
    """One replica: tokenizer + vLLM engine + a connection pool to the feedback database."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.store = self.engine = self.tok = self.model_path = self.version = None
        # vLLM's offline engine is not thread-safe: every engine call runs on this one thread.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._batched.set_max_batch_size(settings["max_batch_size"])

    async def reconfigure(self, config: dict[str, str]) -> None:
        """Apply user_config {model_path, model_version, database_url}: a new model is loaded on
        the engine thread (queued requests wait, none is dropped), a new database URL gets a new
        connection pool."""
        if self.store is None or config["database_url"] != self.store.url:
            old, self.store = self.store, FeedbackStore(config["database_url"])
            if old is not None:
                old.engine.dispose()
        path, version = config["model_path"], config["model_version"]
        if (path, version) != (self.model_path, self.version):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._engine_thread, self._load, path, version)

    def _load(self, model_path: str, model_version: str) -> None:
        import torch
        from transformers import AutoTokenizer

        from actors.rollout import RolloutEngine

        s = self.settings
        if not s["on_gpu"]:
            torch.set_num_threads(max(1, int(round(s["cpus_per_replica"]))))
        tok = AutoTokenizer.from_pretrained(model_path)
        if self.engine is not None:
            self.engine.shutdown()  # before the new one: never two copies of the weights
        self.engine = RolloutEngine(
            model_path,
            max_model_len=s["max_model_len"],
            kv_cache_gb=s["kv_cache_gb"],
            max_num_seqs=max(8, s["max_batch_size"]),
            trust_remote_code=s["trust_remote_code"],
        )
        # The first generate call of a process is slow (kernel set-up): pay it before serving.
        started = time.perf_counter()
        self.engine.generate([tok("warm-up", add_special_tokens=False)["input_ids"]], max_tokens=2)
        warmup_s = time.perf_counter() - started
        from rlhf.data.render import resolve_prompt_format

        fmt = self.settings.get("prompt_format", "auto")
        self.prompt_format = resolve_prompt_format(fmt, tok, 0, "eval.prompt_format")
        self.tok, self.model_path, self.version = tok, model_path, model_version
        logger.info("serving %s (%s); warm-up %.1f s", model_version, model_path, warmup_s)

    # ---- generation ------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[GenItem]) -> list[tuple[Any, str]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine_thread, self._run_batch, items)

    def _run_batch(self, items: list[GenItem]) -> list[tuple[Any, str]]:
        """(sample, model version) per item; one engine call per set of sampling settings.

        A seeded item runs alone: the engine derives each prompt's seed from its position."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            key = (it.max_tokens, it.temperature, it.top_p, None if it.seed is None else i)
            groups[key].append(i)
        out: list[Any] = [None] * len(items)
        for (max_tokens, temperature, top_p, _), index in groups.items():
            samples = self.engine.generate(
                [items[i].prompt_ids for i in index],
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=items[index[0]].seed,
            )
            for i, sample in zip(index, samples):
                out[i] = (sample, self.version)
        return out

    def _encode(self, gen: GenerationRequest) -> list[int]:
        if gen.endpoint == "chat":  # rendered as the trainer renders a prompt (eval.prompt_format)
            from rlhf.data.render import render_prompt

            ids = render_prompt(gen.prompt, self.tok, self.prompt_format)
        else:
            ids = self.tok(gen.prompt)["input_ids"]
        limit = self.settings["max_model_len"]
        if len(ids) + gen.max_tokens > limit:
            raise RequestError(
                "messages" if gen.endpoint == "chat" else "prompt",
                f"{len(ids)} prompt tokens + max_tokens {gen.max_tokens} exceed the model's "
                f"{limit} (serve.max_model_len)",
            )
        return ids

    def _body(self, gen: GenerationRequest, rid: str, version: str, **choice: Any) -> dict:
        chat = gen.endpoint == "chat"
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": version,
            "response_id": rid,
            "model_version": version,
            "choices": [{"index": 0, **choice}],
        }

    def _log(self, gen: GenerationRequest, rid: str, version: str, text: str, sample) -> None:
        params = {k: v for k, v in asdict(gen).items() if k not in ("endpoint", "prompt")}
        self.store.log_response(
            dict(
                id=rid,
                model_version=version,
                endpoint=gen.endpoint,
                prompt=gen.prompt,
                answer=text,
                finish_reason=sample.finish_reason,
                completion_tokens=len(sample.token_ids),
                params=params,
            )
        )

    async def _complete(self, request: Request, endpoint: str):
        s = self.settings
        body = parse_body(await request.body())
        gen = parse_generation(
            body, endpoint, s["max_tokens"], s["max_tokens_limit"], s["temperature"]
        )
        ids = self._encode(gen)
        rid = f"resp-{uuid.uuid4().hex}"
        if gen.stream:
            return StreamingResponse(self._stream(gen, ids, rid), media_type="text/event-stream")
        item = GenItem(ids, gen.max_tokens, gen.temperature, gen.top_p, gen.seed)
        sample, version = await self._batched(item)
        text = self.tok.decode(sample.token_ids, skip_special_tokens=True)
        await asyncio.to_thread(self._log, gen, rid, version, text, sample)
        if endpoint == "chat":
            choice = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        answer = self._body(gen, rid, version, **choice, finish_reason=sample.finish_reason)
        usage = len(ids), len(sample.token_ids)
        answer["usage"] = dict(
            prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=sum(usage)
        )
        return JSONResponse(answer)

    def _chunk(self, gen: GenerationRequest, rid: str, version: str, delta: str, finish) -> str:
        if gen.endpoint == "chat":
            choice = {"delta": {"content": delta}}
        else:
            choice = {"text": delta}
        body = self._body(gen, rid, version, **choice, finish_reason=finish)
        body["object"] += ".chunk" if gen.endpoint == "chat" else ""
        return _sse(body)

    async def _stream(self, gen: GenerationRequest, ids: list[int], rid: str):
        """Server-sent events: a chunk per `stream_chunk_tokens` generated tokens, then [DONE]."""
        out: list[int] = []
        sent, version, sample, step = "", self.version, None, 0
        try:
            while len(out) < gen.max_tokens:
                n = min(self.settings["stream_chunk_tokens"], gen.max_tokens - len(out))
                seed = None if gen.seed is None else gen.seed + step
                item = GenItem(ids + out, n, gen.temperature, gen.top_p, seed)
                sample, version = await self._batched(item)
                out += sample.token_ids
                step += 1
                if sample.finish_reason == "stop":
                    break
                # A byte-level token may end inside a UTF-8 character: hold it back until whole.
                text = self.tok.decode(out, skip_special_tokens=True).rstrip("\ufffd")
                if len(text) > len(sent):
                    yield self._chunk(gen, rid, version, text[len(sent) :], None)
                    sent = text
            text = self.tok.decode(out, skip_special_tokens=True)
            sample.token_ids = out
            await asyncio.to_thread(self._log, gen, rid, version, text, sample)
            yield self._chunk(gen, rid, version, text[len(sent) :], sample.finish_reason)
            yield _sse("[DONE]")
        except Exception:
            logger.exception("stream %s failed", rid)
            yield _sse({"error": {"message": "generation failed", "type": "server_error"}})

    # ---- routes ----------------------------------------------------------------------------

    async def _guarded(self, request: Request, handler, *args):
        """Token check, then the handler; every failure becomes a JSON error, never a trace."""
        try:
            header = request.headers.get("authorization", "")
            digest = hashlib.sha256(header.removeprefix("Bearer ").encode()).hexdigest()
            if not header.startswith("Bearer ") or not secrets.compare_digest(
                digest, self.settings["token_sha256"]
            ):
                raise RequestError("authorization", "missing or wrong bearer token", status=401)
            return await handler(request, *args)
        except RequestError as exc:
            return _error(exc.status, str(exc), exc.field)
        except FeedbackConflict as exc:
            return _error(409, f"id: {exc}", "id")
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            return _error(500, "internal error (details are in the server log)")

    @api.get("/health")
    async def health(self) -> dict:
        replica = serve.get_replica_context().replica_id.unique_id
        return {"status": "ok", "model_version": self.version, "replica": replica}

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def listing(_):
            model = {"id": self.version, "object": "model", "owned_by": "rlhf"}
            return {"object": "list", "data": [{**model, "model_version": self.version}]}

        return await self._guarded(request, listing)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._guarded(request, self._complete, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._guarded(request, self._complete, "completion")

    @api.post("/v1/feedback")
    async def feedback(self, request: Request):
        return await self._guarded(request, self._feedback)

    async def _feedback(self, request: Request):
        fb = parse_feedback(parse_body(await request.body()))
        check_references(fb, await asyncio.to_thread(self.store.prompt_keys, fb.response_ids))
        status = await asyncio.to_thread(self.store.add_feedback, fb)
        code = 201 if status == "stored" else 200
        return JSONResponse({"id": fb.id, "status": status}, status_code=code)


# ---- starting it -------------------------------------------------------------------------------


def model_version(model_path: str | Path) -> str:
    """`<name>-<12 hex of sha256 over config.json and the weights>`; name: the stage folder."""
    path = Path(model_path)
    digest = hashlib.sha256()
    for file in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        with open(file, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                digest.update(block)
    name = path.parent.name if path.name == "model" else path.name
    return f"{name}-{digest.hexdigest()[:12]}"


def deployment_options(scfg, replicas: int | None = None) -> dict[str, Any]:
    """Replicas (fixed, or autoscaling when `serve.autoscaling` and no --replicas) and resources."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scfg.cpus_per_replica, "num_gpus": scfg.gpus_per_replica},
        # Requests a replica holds at once (queued for a batch or writing feedback); beyond
        # this the router queues them, it does not drop them.
        "max_ongoing_requests": max(32, 4 * scfg.max_batch_size),
    }
    if scfg.autoscaling and replicas is None:
        opts["autoscaling_config"] = {
            "min_replicas": scfg.min_replicas,
            "max_replicas": scfg.max_replicas,
            "target_ongoing_requests": scfg.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = replicas or scfg.num_replicas
    return opts


def start_app(
    cfg,
    model_path: str,
    token: str,
    *,
    port: int | None = None,
    replicas: int | None = None,
    app_name: str = "rlhf",
    route_prefix: str = "/",
) -> tuple[str, str]:
    """Deploy the app (Ray and Serve's proxy started if needed); return (base URL, version).

    Serve's HTTP proxy listens on `serve.host` (127.0.0.1 by default) and the port; both are
    fixed for the life of the Ray cluster once Serve runs. Tables are created here, once. Calling
    it again for a running app (another model or database) is Serve's rolling update: new
    replicas start, then the old ones finish their requests and stop. A declarative update of
    user_config alone (`serve deploy`) instead reconfigures the live replicas in place.
    """
    import ray

    from rlhf.runtime import init_ray
    from rlhf.serve.db import default_url

    s = cfg.serve
    url = s.database_url or default_url(cfg.run.dir)
    FeedbackStore(url).create_tables()
    version = s.model_version or model_version(model_path)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb)
    port = port or s.port
    serve.start(http_options={"host": s.host, "port": port})
    settings = {
        **s.model_dump(exclude={"token", "database_url", "model_version"}),
        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
        "trust_remote_code": cfg.model.trust_remote_code,
        "on_gpu": s.gpus_per_replica > 0,
        "prompt_format": cfg.eval.prompt_format,
    }
    from rlhf.serve.deploy import Deployment, run_deployment

    base = f"http://{s.host}:{port}{route_prefix.rstrip('/')}"
    record = Deployment(
        app_name=app_name,
        route_prefix=route_prefix,
        base_url=base,
        ray_address=ray.get_runtime_context().gcs_address,
        database_url=url,
        model_path=str(Path(model_path).resolve()),
        model_version=version,
        settings=settings,
        options=deployment_options(s, replicas),
    )
    run_deployment(record, cfg.run.dir)
    return base, version
