"""The fuzzers' worker: a process that imports ownlm once, then takes cases one JSON line at a time
on stdin and answers one JSON line each on stdout: {"outcome": "ok" | "error" | "crash", "detail"}.
"error" is ownlm's own error (what a user should see), "crash" anything else. Its address space is
capped at what it holds after warming up plus LIMIT_BYTES, so a case that allocates more fails
with MemoryError (a crash) instead of taking the machine; the harness kills it on a hang."""

from __future__ import annotations

import json
import resource
import sys
import traceback
from pathlib import Path

LIMIT_BYTES = 2 << 30
USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


class Worker:
    def __init__(self, corpus: Path):
        import httpx

        import ownlm
        from ownlm.server import ModelPool, Server

        self.ownlm = ownlm
        tiny = ownlm.load(str(corpus / "hf"), dtype="float32", cache=False)
        pool = ModelPool(["tiny"], loader=lambda ref, **_: tiny, max_running=4, max_queue=8)
        self.server = Server(pool, port=0).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=60)
        self.load_model(str(corpus / "tiny.gguf"))  # every lazy import done before the cap
        self.template("{{ messages[0].content }}")
        self.post("/v1/chat/completions", json.dumps({"model": "tiny", "messages": USER, "max_tokens": 1}))

    def load_model(self, path: str) -> None:
        lm = self.ownlm.load(path, cache=False)
        lm.chat_prompt(USER)
        lm.generate("hi", max_tokens=2)

    def template(self, text: str) -> None:
        from ownlm.text.chat import ChatTemplate

        ChatTemplate(text, "<s>", "</s>").render(USER, tools=TOOLS)

    def post(self, route: str, body: str) -> None:
        r = self.http.post(route, content=body.encode("utf-8", "surrogatepass"),
                           headers={"content-type": "application/json"})
        if r.status_code >= 500:
            raise AssertionError(f"HTTP {r.status_code} from {route}: {r.text[:300]}")
        if self.http.get("/health").status_code != 200:
            raise AssertionError("the server stopped answering /health")

    def run(self, case: dict) -> None:
        kind = case["kind"]
        if kind in ("gguf", "hf"):
            self.load_model(case["path"])
        elif kind == "template":
            self.template(Path(case["path"]).read_text(encoding="utf-8", errors="surrogatepass"))
        elif kind == "schema":
            schema = Path(case["path"]).read_text()
            self.post("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                      '"max_tokens": 8, "response_format": {"type": "json_schema", "json_schema": {"name": "x", '
                      f'"schema": {schema}}}}}}}')
        elif kind == "body":
            self.post(case["route"], Path(case["path"]).read_text(encoding="utf-8", errors="surrogatepass"))
        else:
            raise ValueError(f"unknown case kind {kind!r}")


def main() -> None:
    from ownlm.errors import OwnlmError

    worker = Worker(Path(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + LIMIT_BYTES, resource.RLIM_INFINITY))
    print(json.dumps({"outcome": "ready"}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        try:
            worker.run(case)
            result = {"outcome": "ok"}
        except OwnlmError as e:
            result = {"outcome": "error", "detail": f"{type(e).__name__}: {e}"[:300]}
        except BaseException as e:  # exactly what the fuzzer looks for
            frames = traceback.extract_tb(e.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            result = {"outcome": "crash", "detail": f"{type(e).__name__}: {str(e)[:300]} at {where}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
