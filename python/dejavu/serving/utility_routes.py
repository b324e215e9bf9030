"""The routes beside generation: GET /v1/models and /v1/models/{id}, /health, /metrics, /v1/cluster,
and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info and GET /version. Tokenization runs
on the server's tokenizer pool, like a prompt's. lm-eval-harness's remote tokenizer backend uses
/tokenizer_info, /tokenize and /detokenize."""
from __future__ import annotations

import os
import socket

from aiohttp import web

from .http_errors import error
from .protocol import BadRequest, check_text, parse_messages

MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize


def model_card(server) -> dict:
    """One /v1/models entry, with the fields vLLM clients read (root, max_model_len)."""
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "dejavu",
            "root": server.model_name, "parent": None, "max_model_len": server.llm.engine.max_model_len,
            "permission": []}


def cluster_view(server) -> dict:
    """/v1/cluster: the model, each worker with its state, fault tolerance and prefix-cache tiers."""
    eng = server.llm.engine
    state = "failed" if server.engine.error else "up"
    out = {"model": server.model_name}
    if hasattr(eng, "cluster"):
        needed = set(getattr(eng, "_needed", ()))
        # a split deployment's front-end and controller entries carry their own state
        out["workers"] = [dict(w, state=w.get("state") or ("recovering" if w["rank"] in needed else state))
                          for w in eng.cluster()]
        out["fault_tolerance"] = eng.fault_tolerance()
    else:
        out["workers"] = [{"rank": 0, "role": "engine", "stage": 0, "tp_rank": 0, "pid": os.getpid(),
                           "host": socket.gethostname(), "layers": [0, eng.model_config.num_layers],
                           "state": state}]
    tiers = getattr(eng, "prefix_cache_tiers", lambda: None)()
    if tiers is not None:  # each prefix-cache tier's size and occupancy, in blocks
        out["prefix_cache"] = tiers
    return out


def add_routes(server, app: web.Application) -> None:
    tok = server.llm.tokenizer

    async def models(request):
        return web.json_response({"object": "list", "data": [model_card(server)]})

    async def health(request):
        if server.engine.error:
            return error(503, f"engine stopped: {server.engine.error}", "server_error")
        return web.json_response({"status": "ok"})

    async def metrics(request):
        return web.Response(text=server.metrics.render(), content_type="text/plain")

    async def cluster(request):
        return web.json_response(cluster_view(server))

    async def model(request):
        name = request.match_info["model"]
        if name != server.model_name:
            return server.not_found_model(name)
        return web.json_response(model_card(server))

    async def version(request):
        from .. import __version__
        return web.json_response({"version": __version__})

    async def tokenize(request):
        async def run():
            body = await server._body(request)
            if "messages" in body:
                add = body.get("add_generation_prompt", True)
                if not isinstance(add, bool):
                    raise BadRequest("'add_generation_prompt' must be a boolean", "add_generation_prompt")
                msgs = parse_messages(body, server.bounds)
                ids = await server._offload(server._template, msgs)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise BadRequest("'prompt' (a string) or 'messages' is required", "prompt")
                special = body.get("add_special_tokens", True)
                if not isinstance(special, bool):
                    raise BadRequest("'add_special_tokens' must be a boolean", "add_special_tokens")
                hf = getattr(tok, "tok", None)  # a transformers tokenizer can leave out BOS and the like
                encode = server._encode if special or hf is None else (
                    lambda text: list(hf(text, add_special_tokens=False)["input_ids"]))
                ids = await server._offload(encode, check_text(prompt, "prompt"))
            out = {"count": len(ids), "max_model_len": server.bounds.max_model_len, "tokens": ids}
            if body.get("return_token_strs"):
                out["token_strs"] = [tok.decode([t]) for t in ids]
            return web.json_response(out)
        return await server.guarded(run)

    async def detokenize(request):
        async def run():
            body = await server._body(request)
            ids = body.get("tokens")
            if (not isinstance(ids, list) or len(ids) > MAX_DETOKENIZE
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise BadRequest("'tokens' must be a list of token ids", "tokens")
            if any(t < 0 or t >= server.bounds.vocab_size for t in ids):
                raise BadRequest(f"'tokens' token ids must be in [0, {server.bounds.vocab_size})", "tokens")
            return web.json_response({"prompt": await server._offload(tok.decode, ids)})
        return await server.guarded(run)

    async def tokenizer_info(request):
        hf = getattr(tok, "tok", None)
        info = {"tokenizer_class": type(hf or tok).__name__, "model_max_length": server.bounds.max_model_len}
        for name in ("eos_token", "bos_token", "pad_token", "chat_template"):
            v = getattr(hf, name, None)
            info[name] = v if isinstance(v, str) else None
        return web.json_response(info)

    app.add_routes([web.get("/v1/models", models), web.get("/health", health), web.get("/metrics", metrics),
                    web.get("/v1/cluster", cluster), web.get("/v1/models/{model}", model), web.get("/version", version),
                    web.get("/tokenizer_info", tokenizer_info),
                    web.post("/tokenize", tokenize), web.post("/detokenize", detokenize)])
