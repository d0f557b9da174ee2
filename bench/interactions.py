"""Interaction latencies of the real server: a replay of what the browser sends, headless Chromium's
page load, and a gunicorn check.

    python bench/interactions.py [--db DB] [--reps 20] [--tokens 250|600] [--quick]
                                 [--browser] [--gunicorn 4] [--check-browser]

Without --db a database is built first (bench/make_db.py, 12 layers x 12 heads, --tokens tokens).
Prints, per interaction, the median and p95 wall time of its whole callback cascade, the requests
and the bytes sent and received; --browser adds headless Chromium's page load to the first full
render; --gunicorn W starts ``gunicorn -w W`` on ``app.server:serve`` and replays with W concurrent
clients; --check-browser logs the callbacks a real Chromium session fires for the same actions
(performance log) next to the replay's.

The replay (no browser):

:class:`Replayer` reads ``/_dash-layout`` and ``/_dash-dependencies``, keeps the current value of
every component prop (initialised from the layout JSON, updated from callback responses, Patch
responses included), and runs the cascade of a change the way dash-renderer does:

* the callbacks whose inputs include a changed prop are *requested* (with their predecessors, so
  that a callback never re-triggers itself through its own outputs: dash's "circular" pruning);
* a requested callback is *ready* when no other requested callback can, directly or through the
  dependency graph, change one of its inputs; all ready callbacks are POSTed to
  ``/_dash-update-component`` at once (concurrently, as the browser does), with payloads built from
  the current state (``output``, ``outputs``, ``inputs``, ``changedPropIds``, ``state``);
* every prop a response sets triggers its dependents (no equality check, as in the renderer), and
  components that appear in a returned ``children`` fire their initial callbacks;
* until nothing is requested.

Clientside callbacks run in the browser, not on the server: the ones this app has are emulated
(:data:`CLIENTSIDE`: ``vli.tokenClick``); others are skipped (they cost no server time or bytes).
"""
from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import argparse
import os
import random
import sys
from typing import Any, Callable, Optional

import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, scratch_dir, start_server, stats_ms  # noqa: E402


def stringify_id(cid: Any) -> str:
    """The renderer's id string: plain ids as is, dict ids as sorted compact JSON."""
    if isinstance(cid, dict):
        return json.dumps(cid, sort_keys=True, separators=(",", ":"))
    return str(cid)


def split_prop(spec: str) -> tuple[str, str]:
    """'id.prop@hash' -> ('id', 'prop@hash') (ids may be JSON with dots inside)."""
    k = spec.rfind(".")
    return spec[:k], spec[k + 1:]


def parse_outputs(output: str) -> list[tuple[str, str]]:
    if output.startswith("..") and output.endswith(".."):
        return [split_prop(s) for s in output[2:-2].split("...")]
    return [split_prop(output)]


def clean_prop(prop: str) -> str:
    return prop.split("@")[0]


def _is_wild(cid: str) -> bool:
    return cid.startswith("{") and '["' in cid


def _matches(pattern: dict, cid: Any) -> bool:
    if not isinstance(cid, dict) or set(cid) != set(pattern):
        return False
    for k, v in pattern.items():
        if isinstance(v, list):  # ["ALL"], ["MATCH"], ["ALLSMALLER"]: any value
            continue
        if cid[k] != v:
            return False
    return True


# --------------------------------------------------------------------------- Patch (dash 4.x)

def apply_patch(previous: Any, patch: dict) -> Any:
    """Apply a ``{"__dash_patch_update": ..., "operations": [...]}`` value like dash-renderer."""
    value = copy.deepcopy(previous) if previous is not None else {}
    for op in patch.get("operations", []):
        loc, params, name = op["location"], op.get("params", {}), op["operation"]
        if name in ("Assign", "Delete"):
            parent, key = _walk(value, loc[:-1], create=True), loc[-1]
            if name == "Assign":
                _set(parent, key, params["value"])
            else:
                try:
                    del parent[key]
                except (KeyError, IndexError, TypeError):
                    pass
            continue
        if not loc:
            target = value
        else:
            parent, key = _walk(value, loc[:-1], create=True), loc[-1]
            target = _get(parent, key)
        if name == "Merge":
            new = dict(target or {}, **params["value"])
        elif name == "Extend":
            new = list(target or []) + list(params["value"])
        elif name == "Append":
            new = list(target or []) + [params["value"]]
        elif name == "Prepend":
            new = [params["value"]] + list(target or [])
        elif name == "Insert":
            new = list(target or [])
            new.insert(params["index"], params["value"])
        elif name == "Clear":
            new = []
        elif name == "Reverse":
            new = list(reversed(target or []))
        elif name == "Remove":
            new = [x for x in (target or []) if x != params["value"]]
        elif name == "Add":
            new = (target or 0) + params["value"]
        elif name == "Sub":
            new = (target or 0) - params["value"]
        elif name == "Mul":
            new = (target or 0) * params["value"]
        elif name == "Div":
            new = (target or 0) / params["value"]
        else:
            raise ValueError(f"unknown Patch operation {name}")
        if not loc:
            value = new
        else:
            _set(parent, key, new)
    return value


def _get(container, key):
    try:
        return container[key]
    except (KeyError, IndexError, TypeError):
        return None


def _set(container, key, val):
    if isinstance(container, list) and isinstance(key, int):
        while len(container) <= key:
            container.append(None)
    container[key] = val


def _walk(value, loc, create=False):
    cur = value
    for i, key in enumerate(loc):
        nxt = _get(cur, key)
        if nxt is None and create:
            nxt = [] if i + 1 < len(loc) and isinstance(loc[i + 1], int) else {}
            _set(cur, key, nxt)
        cur = nxt
    return cur


# --------------------------------------------------------------------------- the replayer

@dataclass
class Cascade:
    """What one interaction cost: wall seconds of the whole cascade, requests and bytes."""

    seconds: float = 0.0
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    fired: list = field(default_factory=list)      # callback outputs POSTed (in order)
    clientside: list = field(default_factory=list)  # clientside functions run/skipped
    errors: list = field(default_factory=list)


def _tok_click(args, triggered):
    trig = triggered[0] if triggered else None
    if not trig or not trig.get("value"):
        return None
    cid = json.loads(trig["prop_id"][:trig["prop_id"].rfind(".")])
    return [{"index": cid["index"], "t": int(time.time() * 1000)}]


# namespace.function -> f(input values, triggered [{prop_id, value}]) -> list of output values or None
CLIENTSIDE: dict[str, Callable] = {"vli.tokenClick": _tok_click}


class Replayer:
    """One simulated browser tab on ``url`` (see the module docstring)."""

    def __init__(self, url: str, parallel: bool = True, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.parallel = parallel
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=8) if parallel else None
        self.props: dict[str, dict] = {}
        self.raw_ids: dict[str, Any] = {}
        self.order: list[str] = []          # component ids in layout order (for ALL)
        self.owner: dict[str, tuple] = {}   # id -> ancestor ids
        self.deps: list[dict] = []
        self.by_input: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- http
    def _session(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
        return s

    def get(self, path: str, cascade: Cascade) -> bytes:
        r = self._session().get(self.url + path, timeout=self.timeout)
        cascade.requests += 1
        cascade.bytes_sent += len(path) + 100  # request line and usual headers, roughly
        cascade.bytes_received += len(r.content)
        if r.status_code != 200:
            cascade.errors.append(f"GET {path}: {r.status_code}")
        return r.content

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ---------------------------------------------------------------- layout state
    def _register(self, node: Any, ancestors: tuple) -> None:
        if isinstance(node, list):
            for item in node:
                self._register(item, ancestors)
            return
        if not isinstance(node, dict) or "props" not in node or "type" not in node:
            return
        props = node["props"]
        here = ancestors
        if "id" in props:
            sid = stringify_id(props["id"])
            self.props[sid] = {k: v for k, v in props.items() if not _is_component(v)}
            self.raw_ids[sid] = props["id"]
            self.order.append(sid)
            self.owner[sid] = ancestors
            here = ancestors + (sid,)
        for v in props.values():
            if _is_component(v):
                self._register(v, here)

    def _replace_children(self, sid: str, prop: str, value: Any) -> list[str]:
        """Drop the components under ``sid`` and register the new ones; return the new ids."""
        gone = [c for c, anc in self.owner.items() if sid in anc]
        for c in gone:
            self.props.pop(c, None)
            self.raw_ids.pop(c, None)
            self.owner.pop(c, None)
        gone_set = set(gone)
        self.order = [c for c in self.order if c not in gone_set]
        before = set(self.props)
        self._register(value, self.owner.get(sid, ()) + (sid,))
        return [c for c in self.order if c not in before]

    def load(self, cascade: Cascade) -> None:
        """Page load: GET /, the layout and the dependencies, then the initial callbacks."""
        self.get("/", cascade)
        layout = json.loads(self.get("/_dash-layout", cascade))
        self.deps = json.loads(self.get("/_dash-dependencies", cascade))
        self.props, self.raw_ids, self.order, self.owner = {}, {}, [], {}
        self._register(layout, ())
        self.by_input = {}
        for i, d in enumerate(self.deps):
            for inp in d["inputs"]:
                self.by_input.setdefault(f"{inp['id']}.{inp['property']}", []).append(i)
        initial = [(i, frozenset(), frozenset()) for i, d in enumerate(self.deps)
                   if not d.get("prevent_initial_call") and self._outputs_present(d)]
        self._run(initial, cascade)

    def _outputs_present(self, d: dict) -> bool:
        for cid, _ in parse_outputs(d["output"]):
            if _is_wild(cid):
                if not self._expand(cid):
                    return False
            elif cid not in self.props:
                return False
        return True

    def _expand(self, cid: str) -> list[str]:
        pattern = json.loads(cid)
        return [c for c in self.order if _matches(pattern, self.raw_ids.get(c))]

    def value(self, cid: str, prop: str) -> Any:
        return self.props.get(cid, {}).get(prop)

    # ---------------------------------------------------------------- interactions
    def interact(self, changes: dict[tuple[str, str], Any]) -> Cascade:
        """Set props as the user's action would, then run the cascade; return its cost."""
        cascade = Cascade()
        t0 = time.perf_counter()
        requested = []
        for (cid, prop), val in changes.items():
            self.props.setdefault(cid, {})[prop] = val
            requested += self._triggered(cid, prop, frozenset())
        self._run(requested, cascade, t0)
        return cascade

    def page_load(self) -> Cascade:
        cascade = Cascade()
        t0 = time.perf_counter()
        self.load(cascade)
        cascade.seconds = time.perf_counter() - t0
        return cascade

    def _triggered(self, cid: str, prop: str, preds: frozenset) -> list:
        out = []
        keys = [f"{cid}.{prop}"]
        raw = self.raw_ids.get(cid)
        if isinstance(raw, dict):  # pattern-matching inputs
            for key in self.by_input:
                if key.startswith("{"):
                    pid, pprop = split_prop(key)
                    if pprop == prop and _matches(json.loads(pid), raw):
                        keys.append(key)
        for key in keys:
            for i in self.by_input.get(key, []):
                out.append((i, frozenset([f"{cid}.{prop}"]), preds))
        return out

    # ---------------------------------------------------------------- the cascade
    def _reach(self, i: int, memo: dict) -> set:
        """Every 'id.prop' that callback i can change, directly or through its dependents."""
        if i in memo:
            return memo[i]
        memo[i] = set()
        outs = {f"{c}.{clean_prop(p)}" for c, p in parse_outputs(self.deps[i]["output"])}
        acc = set(outs)
        for o in outs:
            for j in self.by_input.get(o, []):
                if j != i:
                    acc |= self._reach(j, memo)
        memo[i] = acc
        return acc

    def _run(self, requested: list, cascade: Cascade, t0: Optional[float] = None) -> None:
        t0 = time.perf_counter() if t0 is None else t0
        memo: dict = {}
        pending: dict[int, tuple[set, frozenset]] = {}

        def add(items):
            for i, changed, preds in items:
                if i in preds:  # circular: a callback re-triggered by its own outputs
                    continue
                if i in pending:
                    pending[i] = (pending[i][0] | set(changed), pending[i][1] | preds)
                else:
                    pending[i] = (set(changed), preds)

        add(requested)
        guard = 0
        while pending:
            guard += 1
            if guard > 200:
                cascade.errors.append("cascade did not settle after 200 rounds")
                break
            ready = []
            for i in pending:
                ins = {f"{x['id']}.{x['property']}" for x in self.deps[i]["inputs"]}
                blocked = any(j != i and ins & self._reach(j, memo) for j in pending)
                if not blocked:
                    ready.append(i)
            if not ready:  # a cycle: take them all, as the renderer eventually would
                ready = list(pending)
            batch = [(i, pending.pop(i)) for i in ready]
            server = [(i, ch, pr) for i, (ch, pr) in batch if not self.deps[i].get("clientside_function")]
            client = [(i, ch, pr) for i, (ch, pr) in batch if self.deps[i].get("clientside_function")]
            results = []
            for i, ch, pr in client:
                results.append((i, pr, self._clientside(i, ch, cascade)))
            if server:
                payloads = [(i, pr, self._payload(i, ch)) for i, ch, pr in server]
                if self._pool is not None and len(payloads) > 1:
                    futs = [(i, pr, self._pool.submit(self._post, p)) for i, pr, p in payloads]
                    posted = [(i, pr, f.result()) for i, pr, f in futs]
                else:
                    posted = [(i, pr, self._post(p)) for i, pr, p in payloads]
                for i, pr, (status, sent, body) in posted:
                    cascade.requests += 1
                    cascade.bytes_sent += sent
                    cascade.bytes_received += len(body)
                    cascade.fired.append(self.deps[i]["output"])
                    if status == 204:
                        results.append((i, pr, None))
                    elif status != 200:
                        cascade.errors.append(f"{self.deps[i]['output'][:80]}: HTTP {status} "
                                              f"{body[:200].decode('utf-8', 'replace')}")
                        results.append((i, pr, None))
                    else:
                        results.append((i, pr, json.loads(body).get("response")))
            for i, pr, response in results:
                if not response:
                    continue
                preds = pr | {i}
                for cid, props in response.items():
                    for prop, val in props.items():
                        add(self._apply(cid, clean_prop(prop), val, preds))
        cascade.seconds = time.perf_counter() - t0

    def _apply(self, cid: str, prop: str, val: Any, preds: frozenset) -> list:
        if isinstance(val, dict) and "__dash_patch_update" in val:
            val = apply_patch(self.value(cid, prop), val)
        triggered = self._triggered(cid, prop, preds)
        if prop == "children" and cid in self.props:
            new = self._replace_children(cid, prop, val)
            new_set = set(new)
            for i, d in enumerate(self.deps):
                if d.get("prevent_initial_call"):
                    continue
                touched = {x["id"] for x in d["inputs"]} | {c for c, _ in parse_outputs(d["output"])}
                if touched & new_set:
                    triggered.append((i, frozenset(), preds))
        self.props.setdefault(cid, {})[prop] = val
        return triggered

    def _fill(self, specs: list) -> list:
        out = []
        for s in specs:
            cid, prop = s["id"], s["property"]
            if _is_wild(cid):
                out.append([{"id": self.raw_ids[c], "property": prop, "value": self.value(c, prop)}
                            for c in self._expand(cid)])
            else:
                out.append({"id": cid, "property": prop, "value": self.value(cid, prop)})
        return out

    def _payload(self, i: int, changed: set) -> dict:
        d = self.deps[i]
        outs = parse_outputs(d["output"])
        outputs = []
        for cid, prop in outs:
            if _is_wild(cid):
                outputs.append([{"id": self.raw_ids[c], "property": clean_prop(prop)} for c in self._expand(cid)])
            else:
                outputs.append({"id": cid, "property": clean_prop(prop)})
        payload = {"output": d["output"], "outputs": outputs if len(outs) > 1 else outputs[0],
                   "inputs": self._fill(d["inputs"]), "changedPropIds": sorted(changed),
                   "parsedChangedPropsIds": sorted(changed)}
        if d["state"]:
            payload["state"] = self._fill(d["state"])
        return payload

    def _post(self, payload: dict) -> tuple[int, int, bytes]:
        data = json.dumps(payload).encode()
        r = self._session().post(self.url + "/_dash-update-component", data=data, timeout=self.timeout,
                                 headers={"Content-Type": "application/json"})
        return r.status_code, len(data), r.content

    def _clientside(self, i: int, changed: set, cascade: Cascade) -> Optional[dict]:
        d = self.deps[i]
        fn = d["clientside_function"]
        name = f"{fn['namespace']}.{fn['function_name']}"
        emulate = CLIENTSIDE.get(name)
        cascade.clientside.append(name + ("" if emulate else " (skipped)"))
        if emulate is None:
            return None
        triggered = [{"prop_id": c, "value": self.value(*split_prop(c))} for c in sorted(changed)]
        values = emulate(self._fill(d["inputs"]), triggered)
        if values is None:
            return None
        response: dict = {}
        for (cid, prop), v in zip(parse_outputs(d["output"]), values):
            response.setdefault(cid, {})[clean_prop(prop)] = v
        return response


def _is_component(v: Any) -> bool:
    if isinstance(v, dict):
        return "props" in v and "type" in v
    if isinstance(v, list):
        return any(_is_component(x) for x in v)
    return False


# --------------------------------------------------------------------------- the interactions

class Scenario:
    """The user's actions, as prop changes, on a page already loaded by ``rep`` (a Replayer).

    Each action is chosen so that repeating it does the same work each time (alternating examples,
    heads, statistics, layers; cycling tokens), and example ids are cycled over the database so that
    "select another example" does not always hit warm caches.
    """

    def __init__(self, rep: Replayer, ex_ids: list[int], text_tokens: list[int], patch_tokens: list[int],
                 grid: tuple[int, int], n_layers: int, n_heads: int):
        """text_tokens: positions of the text tokens; patch_tokens: the token of each grid cell, row-major
        (of the first example: in any token order, a decoder's prompt included)."""
        self.rep, self.ex_ids, self.grid = rep, ex_ids, grid
        self.text_tokens, self.patch_tokens = text_tokens, patch_tokens
        self.n_layers, self.n_heads = n_layers, n_heads
        self.k = 0

    def tick(self) -> int:
        self.k += 1
        return self.k

    def _n(self, cid, prop):
        return (self.rep.value(cid, prop) or 0) + 1

    def select_example(self):
        cur = self.rep.value("example-select", "value")
        pos = self.ex_ids.index(cur) if cur in self.ex_ids else -1
        return {("example-select", "value"): self.ex_ids[(pos + 1) % len(self.ex_ids)]}

    def click_text_token(self):
        i = self.text_tokens[1 + self.tick() % max(len(self.text_tokens) - 2, 1)]
        cid = stringify_id({"index": i, "type": "token"})
        return {(cid, "n_clicks"): self._n(cid, "n_clicks")}

    def box_select(self):
        rows, cols = self.grid
        r0 = self.tick() % max(rows - 3, 1)
        pts = []
        for r in range(r0, min(r0 + 3, rows)):
            for c in range(2, min(5, cols)):
                k = r * cols + c
                if k >= len(self.patch_tokens):  # a grid with cells the model kept no patch of
                    continue
                pts.append({"curveNumber": 1, "pointNumber": k, "pointIndex": k, "x": c, "y": r,
                            "customdata": self.patch_tokens[k]})
        return {("image-graph", "selectedData"): {"points": pts, "range": {"x": [0, 1], "y": [0, 1]}}}

    def click_head(self):
        k = self.tick()
        return {("head-graph", "clickData"): {"points": [{"curveNumber": 0, "pointNumber": [k % self.n_layers, k % self.n_heads],
                                                        "x": k % self.n_heads, "y": k % self.n_layers,
                                                        "z": 0.5}]}}

    def change_statistic(self):
        opts = [o["value"] for o in self.rep.value("head-stat", "options") or []]
        cur = self.rep.value("head-stat", "value")
        nxt = opts[(opts.index(cur) + 1) % len(opts)] if cur in opts else opts[0]
        return {("head-stat", "value"): nxt}

    def move_tsne_layer(self):
        cur = self.rep.value("tsne-layer", "value") or 0
        return {("tsne-layer", "value"): (cur - 1) % (self.n_layers + 1)}

    def hover_tsne(self):
        k = self.tick() % min(50, len(self.patch_tokens))
        return {("tsne-graph", "hoverData"): {"points": [{"curveNumber": 1, "pointNumber": k, "pointIndex": k,
                                                         "customdata": self.patch_tokens[k], "x": 0.0, "y": 0.0,
                                                         "bbox": {"x0": 100, "x1": 106, "y0": 80, "y1": 86}}]}}

    def play_setup(self):
        """Start playing (untimed) when the player is stopped."""
        if self.rep.value("play-interval", "disabled") in (None, True):
            self.rep.interact({("play", "n_clicks"): self._n("play", "n_clicks")})

    def play_step(self):
        return {("play-interval", "n_intervals"): self._n("play-interval", "n_intervals")}

    def open_matrix(self):
        return {("view-tabs", "value"): "matrix"}

    def matrix_teardown(self):
        self.rep.interact({("view-tabs", "value"): "tsne"})


# name, action, setup before each rep (untimed), teardown after each rep (untimed)
INTERACTIONS = [
    ("select another example", "select_example", None, None),
    ("click a text token", "click_text_token", None, None),
    ("box-select image patches", "box_select", None, None),
    ("click a head", "click_head", None, None),
    ("change the statistic", "change_statistic", None, None),
    ("move the t-SNE layer", "move_tsne_layer", None, None),
    ("hover a t-SNE point", "hover_tsne", None, None),
    ("play one step", "play_step", "play_setup", None),
    ("open the attention matrix", "open_matrix", None, "matrix_teardown"),
]


def db_shape(db_path: str) -> dict:
    from app.database.database import VliLmdb

    db = VliLmdb(db_path)
    try:
        ids = db.example_ids()
        info = db.example(ids[0])
        cells = sorted((c[1], c[0], i) for i, c in enumerate(info.coords) if c is not None and info.patch_grid[i] == 0)
        return {"ex_ids": ids, "txt_len": info.txt_len, "grid": info.grid or (1, 1),
                "text_tokens": [int(i) for i in np.flatnonzero(info.is_text)], "patch_tokens": [i for _, _, i in cells],
                "n_layers": db.n_layers, "n_heads": db.n_heads, "n_tokens": info.n_tokens}
    finally:
        db.close()


def measure(url: str, shape: dict, reps: int, only: Optional[list[str]] = None, warmup: int = 1,
            think: float = 0.0, seed: int = 0) -> dict:
    """Replay every interaction ``reps`` times on a fresh page; {name: [Cascade, ...]}. With
    ``think`` > 0, pause 0.5-1.5 x ``think`` seconds (random, ``seed``) after each interaction, as a
    person reading the result would."""
    pause = random.Random(seed)
    rep = Replayer(url)
    results: dict[str, list[Cascade]] = {"page load (replay)": []}
    try:
        for _ in range(max(3, min(reps, 10))):
            results["page load (replay)"].append(rep.page_load())
            if think:
                time.sleep(think * pause.uniform(0.5, 1.5))
        sc = Scenario(rep, shape["ex_ids"], shape["text_tokens"], shape["patch_tokens"], tuple(shape["grid"]), shape["n_layers"],
                      shape["n_heads"])
        # A selection first, so that head clicks, layers etc. have a token to show.
        rep.interact(sc.click_text_token())
        for name, action, setup, teardown in INTERACTIONS:
            if only and name not in only:
                continue
            runs = []
            for k in range(warmup + reps):
                if setup:
                    getattr(sc, setup)()
                c = rep.interact(getattr(sc, action)())
                if teardown:
                    getattr(sc, teardown)()
                if k >= warmup:
                    runs.append(c)
                if think:
                    time.sleep(think * pause.uniform(0.5, 1.5))
            results[name] = runs
    finally:
        rep.close()
    return results


def print_table(results: dict, title: str = "") -> None:
    if title:
        print(title)
    print(f"  {'interaction':28s} {'median ms':>9s} {'p95 ms':>8s} {'reqs':>5s} {'sent kB':>8s} {'recv kB':>9s}  "
          f"callbacks (server) / errors")
    for name, runs in results.items():
        if not runs:
            continue
        med, p95 = stats_ms([c.seconds for c in runs])
        reqs = np.median([c.requests for c in runs])
        sent = np.median([c.bytes_sent for c in runs]) / 1000
        recv = np.median([c.bytes_received for c in runs]) / 1000
        errs = sum(len(c.errors) for c in runs)
        fired = ", ".join(_short(o) for o in runs[-1].fired)
        print(f"  {name:28s} {med:9.1f} {p95:8.1f} {reqs:5.0f} {sent:8.1f} {recv:9.1f}  {fired}"
              + (f"  ERRORS {errs}: {runs[-1].errors[:1] or [c.errors for c in runs if c.errors][0][:1]}"
                 if errs else ""))


def _short(output: str) -> str:
    outs = parse_outputs(output)
    return "+".join(f"{c}.{clean_prop(p)}" for c, p in outs[:2]) + ("+…" if len(outs) > 2 else "")


# --------------------------------------------------------------------------- headless Chromium

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1440,900")

FULL_RENDER_JS = """
const ok = (sel) => { const el = document.querySelector(sel); return !!(el && el.querySelector('.main-svg')); };
const head = document.querySelector('#head-graph .heatmaplayer image, #head-graph .hm image, #head-graph .heatmaplayer');
const img = document.querySelector('#image-graph .layer-below image, #image-graph .imagelayer image');
const tsne = document.querySelectorAll('#tsne-graph .scatterlayer .point').length;
const loading = document.querySelector('[data-dash-is-loading="true"]');
return ok('#head-graph') && ok('#image-graph') && ok('#tsne-graph') && !!head && !!img && tsne > 0 && !loading;
"""

# Installed before the page's own scripts: checks FULL_RENDER_JS after every DOM change (batched
# per animation frame) and keeps the first moment it holds, so that the measurement does not
# depend on how often the benchmark polls (polling through chromedriver costs CPU of its own).
RENDER_CLOCK_JS = """
window.__vliFullRender = null;
const fullyRendered = () => { %s };
let queued = false;
const check = () => {
  queued = false;
  if (window.__vliFullRender === null && fullyRendered()) window.__vliFullRender = performance.now();
};
new MutationObserver(() => {
  if (!queued && window.__vliFullRender === null) { queued = true; requestAnimationFrame(check); }
}).observe(document, {childList: true, subtree: true, attributes: true});
""" % FULL_RENDER_JS


def chrome_driver(log_performance: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for f in CHROME_FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={scratch_dir('vli-bench-chromium-')}")
    if log_performance:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def browser_page_load(url: str, reps: int = 5, timeout: float = 60.0) -> tuple[list[float], list[float]]:
    """Seconds from navigationStart to the first full render (head heatmap, image, t-SNE drawn,
    nothing loading), as the page itself timed it (RENDER_CLOCK_JS), each load in a fresh tab of
    one browser with a fresh profile: (the first two loads, the ``reps`` after them). Chromium
    compiles plotly.js on the first loads and keeps V8's code cache from the third on, as a
    browser that has opened the app before has it."""
    drv = chrome_driver()
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RENDER_CLOCK_JS})
    out = []
    try:
        for _ in range(reps + 2):
            drv.get("about:blank")
            drv.get(url + "/")
            t_end = time.time() + timeout
            ms = None
            while ms is None and time.time() < t_end:
                time.sleep(0.25)
                ms = drv.execute_script("return window.__vliFullRender;")  # ms since navigationStart
            if ms is None:
                raise RuntimeError("the page did not render fully within the timeout")
            out.append(ms / 1000.0)
    finally:
        drv.quit()
    return out[:2], out[2:]


def browser_callbacks(url: str, shape: dict) -> list[tuple[str, list[str]]]:
    """Which callbacks a real Chromium session POSTs for page load, a token click, a head click and
    another example (from the performance log), to compare with the replay's."""
    from selenium.webdriver.common.by import By

    drv = chrome_driver()
    # Record every callback request the page makes (wrapping fetch before the page's scripts run).
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__vliCalls = [];
        const f = window.fetch;
        window.fetch = function (url, opts) {
            try { if (String(url).includes('/_dash-update-component') && opts && opts.body)
                      window.__vliCalls.push(JSON.parse(opts.body).output); } catch (e) {}
            return f.apply(this, arguments);
        };"""})
    seen: list[tuple[str, list[str]]] = []

    def drain(label):
        time.sleep(2.0)
        outs = drv.execute_script("const c = window.__vliCalls; window.__vliCalls = []; return c;")
        seen.append((label, [_short(o) for o in outs]))

    try:
        drv.get(url + "/")
        t_end = time.time() + 60
        while time.time() < t_end and not drv.execute_script(FULL_RENDER_JS):
            time.sleep(0.05)
        drain("page load")
        drv.find_element(By.CSS_SELECTOR, "#text-tokens .tok:not(.special)").click()
        drain("click a text token")
        drv.find_element(By.ID, "example-next").click()
        drain("select another example (next button)")
        drv.find_element(By.ID, "view-tabs").find_elements(By.CSS_SELECTOR, ".tab")[1].click()
        drain("open the attention matrix")
    finally:
        drv.quit()
    return seen


def replay_callbacks(url: str, shape: dict) -> list[tuple[str, list[str]]]:
    rep = Replayer(url)
    sc = Scenario(rep, shape["ex_ids"], shape["text_tokens"], shape["patch_tokens"], tuple(shape["grid"]), shape["n_layers"], shape["n_heads"])
    out = [("page load", [_short(o) for o in rep.page_load().fired])]
    cid = stringify_id({"index": 1, "type": "token"})
    out.append(("click a text token", [_short(o) for o in rep.interact({(cid, "n_clicks"): 1}).fired]))
    out.append(("select another example (next button)",
                [_short(o) for o in rep.interact({("example-next", "n_clicks"): 1}).fired]))
    out.append(("open the attention matrix", [_short(o) for o in rep.interact(sc.open_matrix()).fired]))
    rep.close()
    return out


# --------------------------------------------------------------------------- gunicorn

def gunicorn_check(db: str, shape: dict, workers: int, reps: int, think: float) -> None:
    """``gunicorn -w W`` on the database: one replaying client, then W concurrent ones; both with
    no pause between interactions (a stress test: each client keeps a core busy), then both with
    a person's pause of about ``think`` seconds after each interaction (W people at W browsers)."""
    server = start_server(db, gunicorn_workers=workers)
    try:
        print(f"gunicorn -w {workers} (app.server:serve): ready in {server.ready_seconds:.2f} s")
        for pause in (0.0, think) if think else (0.0,):
            how = f"a pause of {pause:g} s x U(0.5, 1.5) after each interaction" if pause else "no pause"
            one = measure(server.url, shape, reps, think=pause)
            print_table(one, f"  one client, {how}:")
            many, errors = _concurrent_clients(server.url, shape, reps, workers, pause)
            merged: dict[str, list] = {}
            for m in many:
                for name, runs in (m or {}).items():
                    merged.setdefault(name, []).extend(runs)
            print_table(merged, f"  {workers} concurrent clients, {how} (all clients' runs together):")
            n_err = len(errors) + sum(len(c.errors) for runs in merged.values() for c in runs)
            print(f"  errors: {n_err}" + (f" ({errors[:2]})" if errors else ""))
            for name in one:
                if name in merged and merged[name]:
                    p1 = stats_ms([c.seconds for c in one[name]])[1]
                    pw = stats_ms([c.seconds for c in merged[name]])[1]
                    print(f"    p95 {name:28s} 1 client {p1:7.1f} ms, {workers} clients {pw:7.1f} ms "
                          f"({pw / p1:.1f}x)")
    finally:
        server.stop()


def _concurrent_clients(url: str, shape: dict, reps: int, workers: int, think: float):
    """``workers`` clients replaying at once (threads; the replay waits on the network)."""
    many: list[dict] = [None] * workers
    errors: list[str] = []

    def client(k):
        try:
            many[k] = measure(url, shape, reps, think=think, seed=k + 1)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return many, errors


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", help="an existing database (default: build one in a temporary folder)")
    p.add_argument("--n", type=int, default=12, help="examples in the built database (default 12)")
    p.add_argument("--tokens", type=int, default=250, choices=(250, 600),
                   help="250: 40 text + 14x15 patches; 600: 60 text + 27x20 patches")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--fast-tsne", action="store_true", help="build the database with PCA maps (faster)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--browser", action="store_true", help="also headless Chromium's page load")
    p.add_argument("--check-browser", action="store_true", help="compare the replay's callbacks with Chromium's")
    p.add_argument("--gunicorn", type=int, default=0, metavar="W", help="also gunicorn -w W with W clients")
    p.add_argument("--think", type=float, default=1.0, metavar="S",
                   help="with --gunicorn, also a run with a person's pause of about S s between interactions "
                        "(0: only the no-pause stress run)")
    p.add_argument("--quick", action="store_true", help="5 reps, small database, minutes at most")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 5)
    db = args.db
    if db is None:
        from bench.make_db import build

        db = scratch_dir("vli-bench-db-")
        text, grid = (40, (14, 15)) if args.tokens == 250 else (60, (27, 20))
        n = min(args.n, 4) if args.quick else args.n
        t0 = time.perf_counter()
        build(db, n, layers=args.layers, heads=args.heads, text=text, grid=grid, hidden=args.hidden,
              fast_tsne=args.fast_tsne, quiet=True)
        print(f"built {n} examples in {time.perf_counter() - t0:.1f} s: {db}")
    shape = db_shape(db)
    print(f"machine: {machine()}")
    print(f"database: {db}: {len(shape['ex_ids'])} examples, {shape['n_layers']} layers x {shape['n_heads']} heads, "
          f"{shape['n_tokens']} tokens ({shape['txt_len']} text), grid {shape['grid']}")
    server = start_server(db)
    try:
        print(f"server (run_app.py) ready in {server.ready_seconds:.2f} s (process start to first 200)")
        results = measure(server.url, shape, args.reps)
        print_table(results, f"replayed cascades, {args.reps} repetitions each (median / p95 of the whole cascade):")
        if args.browser:
            first, loads = browser_page_load(server.url, reps=3 if args.quick else 10)
            med, p95 = stats_ms(loads)
            print(f"  {'page load (Chromium)':28s} {med:9.1f} {p95:8.1f}   navigationStart to head heatmap, "
                  f"image and t-SNE drawn ({len(loads)} loads after the first two of a fresh profile: "
                  f"{', '.join(f'{1000 * t:.0f}' for t in first)} ms)")
        if args.check_browser:
            real, replay = browser_callbacks(server.url, shape), replay_callbacks(server.url, shape)
            print("callbacks fired: Chromium vs replay")
            for (label, a), (_, b) in zip(real, replay):
                same = sorted(a) == sorted(b)
                print(f"  {label}: {'SAME' if same else 'DIFFERENT'}\n    chromium: {a}\n    replay:   {b}")
    finally:
        server.stop()
    if args.gunicorn:
        gunicorn_check(db, shape, args.gunicorn, args.reps, args.think)
    return 0


if __name__ == "__main__":
    sys.exit(main())
