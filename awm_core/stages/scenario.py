"""Stage 1: scenarios, from a seed list expanded by an LLM.

Reply: JSON ``{"scenarios": [{"name", "description", "category", "stateful": bool}]}``.

The seed list steers the model (a category-balanced sample of it is shown as examples); the
model's candidates form the pool. Selection (``select``) walks the pool round-robin over
categories (in order of first appearance), which keeps the mix balanced, and drops a
candidate when it is not stateful, when its embedding's cosine similarity to a scenario
already kept (in this run or in the catalog) exceeds the threshold, or when its category has
reached the cap. The first N kept are the run's scenarios; every drop is reported with its
reason, and candidates kept beyond N are reported as surplus.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from awm_core.errors import ArtifactError, StageError
from awm_core.models import Scenario, slugify
from awm_core.stages.base import extract_json, messages

NAME = "scenario"
PROMPT_VERSION = "scenario-v2"
JSON_MODE = True
RUN_WIDE_ID = "_"  # the fixture/ledger "scenario id" of run-wide stages

SYSTEM = """
You propose everyday software applications that are good material for simulated tool-use environments: each
one keeps structured state in a small relational database (entities with ids, statuses, amounts, dates, short
text) that users create, read, update and delete. Content-heavy services (news, video, encyclopedias), search
engines, live feeds, chat assistants and anything needing machine-learning inference are NOT suitable.
"""

USER = """
Here are examples of suitable applications (name: description [category]):
{examples}

Propose {ask} applications of this kind: {n} needed plus {margin} spare, because proposals that are
near-duplicates, not stateful or in a full category are dropped. You may use the examples as they are or as
inspiration, but no two of your proposals may be the same application under another name, and none may
repeat these already-built ones:
{avoid}
For each:
- each with a short name (2-4 words), a one-sentence description naming its main entities and operations,
  and a category (snake_case; reuse the example categories where they fit);
- "stateful": true when the application is mainly CRUD over stored records, false otherwise (be honest:
  false ones are filtered out).

Answer with JSON only: {{"scenarios": [{{"name": "...", "description": "...", "category": "...", "stateful": true}}]}}
"""


@dataclass
class Candidate:
    name: str
    description: str
    category: str = "general"
    stateful: bool = True
    source: str = "seed"  # seed | generated

    @property
    def text(self) -> str:
        return scenario_text(self.name, self.description)


def scenario_text(name: str, description: str) -> str:
    """What a scenario's embedding is made of (de-duplication here, coverage in the quality gate)."""
    return f"{name}: {description}"


@dataclass
class Selection:
    scenarios: list[Scenario]
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"name", "reason"}
    candidates: int = 0
    records: list[Any] = field(default_factory=list)


def load_seeds(path: Path | str | None = None) -> list[Candidate]:
    """The seed list: a JSON list of {name, description, category} (the packaged one by default)."""
    if path is None:
        text = resources.files("awm_core.stages").joinpath("seed_scenarios.json").read_text()
        where = "packaged seed_scenarios.json"
    else:
        from awm_core.files import read_text

        text, where = read_text(path, "seed list"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError("seed list", [f"{where}: not JSON ({exc})"]) from None
    if isinstance(data, dict):
        data = data.get("scenarios", data.get("seeds"))
    if not isinstance(data, list):
        raise ArtifactError("seed list", [f"{where}: expected a JSON list of {{name, description, category}}"])
    out, problems = [], []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not item.get("name") or not item.get("description"):
            problems.append(f"{where} entry {i}: needs a name and a description")
            continue
        out.append(Candidate(item["name"], item["description"], item.get("category") or "general",
                             bool(item.get("stateful", True)), "seed"))
    if problems:
        raise ArtifactError("seed list", problems)
    return out


EXAMPLES_SHOWN = 24
# Extra candidates asked for beyond the scenarios still needed. Selection drops near-duplicates,
# stateless ones and full categories; a quarter more (at least one) covers the usual losses in
# one round, and select-scenarios asks again for whatever is still missing.
MARGIN_SHARE = 0.25


def margin(needed: int) -> int:
    return max(1, math.ceil(needed * MARGIN_SHARE))


def candidates_to_ask(needed: int) -> int:
    """How many proposals to ask for when ``needed`` scenarios are still missing."""
    return needed + margin(needed)


def build_messages(seeds: list[Candidate], n: int, previous_errors: list[str], *, avoid: list[str] = (),
                   offset: int = 0) -> list[dict]:
    """A request for ``candidates_to_ask(n)`` proposals when ``n`` scenarios are needed;
    ``offset`` rotates which seeds are shown, so later rounds see other examples."""
    ordered = round_robin(seeds)
    shown = [ordered[(offset + i) % len(ordered)] for i in range(min(EXAMPLES_SHOWN, len(ordered)))] if ordered else []
    examples = "\n".join(f"- {c.name}: {c.description} [{c.category}]" for c in shown)
    avoid_text = ", ".join(avoid) if avoid else "(none yet)"
    user = USER.format(examples=examples, n=n, ask=candidates_to_ask(n), margin=margin(n), avoid=avoid_text)
    return messages(SYSTEM, user, previous_errors)


def parse(text: str) -> list[Candidate]:
    data = extract_json(text, NAME)
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), list):
        raise StageError(NAME, ['the reply must be a JSON object with a "scenarios" list'])
    out, errors = [], []
    for i, item in enumerate(data["scenarios"]):
        if not isinstance(item, dict):
            errors.append(f"scenarios.{i} must be an object")
            continue
        missing = [k for k in ("name", "description", "category", "stateful") if k not in item]
        if missing:
            errors.append(f"scenarios.{i} lacks {', '.join(missing)}")
            continue
        if not isinstance(item["stateful"], bool):
            errors.append(f"scenarios.{i}.stateful must be true or false")
            continue
        try:
            slugify(str(item["name"]))
        except ArtifactError:
            errors.append(f"scenarios.{i}.name {item['name']!r} has no letters or digits")
            continue
        out.append(Candidate(str(item["name"]).strip(), str(item["description"]).strip(),
                             slugify(str(item["category"])), item["stateful"], "generated"))
    if errors:
        raise StageError(NAME, errors)
    if not out:
        raise StageError(NAME, ["the scenarios list is empty"])
    return out


def run(client, seeds: list[Candidate], n: int, *, attempt: int, previous_errors: list[str],
        avoid: list[str] = (), offset: int = 0):
    """One expansion call for ``n`` more scenarios: returns (candidates, [record]); a bad reply
    raises StageError with records."""
    msgs = build_messages(seeds, n, previous_errors, avoid=avoid, offset=offset)
    res = client.chat(msgs, stage=NAME, scenario_id=RUN_WIDE_ID,
                      attempt=attempt, json_mode=True)
    try:
        return parse(res.content), [res.record]
    except StageError as exc:
        exc.records = [res.record]
        raise


def round_robin(pool: list[Candidate]) -> list[Candidate]:
    by_cat: dict[str, list[Candidate]] = {}
    for c in pool:
        by_cat.setdefault(c.category, []).append(c)
    out, i = [], 0
    while len(out) < len(pool):
        for items in by_cat.values():
            if i < len(items):
                out.append(items[i])
        i += 1
    return out


def select(pool: list[Candidate], n: int, embed, *, threshold: float, category_cap: int,
           already: list[Scenario] | None = None) -> Selection:
    """Pick up to ``n`` scenarios from ``pool``; ``embed(texts) -> normalised rows``.

    ``already`` holds scenarios made by earlier runs: new picks must not duplicate them.
    """
    import numpy as np

    ordered = round_robin(pool)
    kept: list[Candidate] = []
    dropped: list[dict[str, Any]] = []
    ids: set[str] = {s.id for s in already or []}
    per_cat: dict[str, int] = {}
    for s in already or []:
        per_cat[s.category] = per_cat.get(s.category, 0) + 1
    prior = [scenario_text(s.name, s.description) for s in already or []]
    vectors = embed(prior + [c.text for c in ordered]) if ordered else np.zeros((0, 1))
    kept_vecs = list(vectors[: len(prior)])
    for c, vec in zip(ordered, vectors[len(prior):]):
        sid = slugify(c.name)
        if not c.stateful:
            dropped.append({"name": c.name, "source": c.source, "reason": "not stateful"})
            continue
        if sid in ids:
            dropped.append({"name": c.name, "source": c.source, "reason": f"same id as an earlier scenario ({sid})"})
            continue
        if kept_vecs:
            sims = np.asarray(kept_vecs) @ vec
            j = int(np.argmax(sims))
            if sims[j] > threshold:
                other = (prior + [k.name for k in kept])[j]
                other = other.split(":")[0]
                dropped.append({"name": c.name, "source": c.source,
                                "reason": f"near-duplicate of {other} (cosine {sims[j]:.2f} > {threshold})"})
                continue
        if per_cat.get(c.category, 0) >= category_cap:
            dropped.append({"name": c.name, "source": c.source, "reason": f"category {c.category} is full ({category_cap})"})
            continue
        kept.append(c)
        kept_vecs.append(vec)
        ids.add(sid)
        per_cat[c.category] = per_cat.get(c.category, 0) + 1
    for c in kept[n:]:
        dropped.append({"name": c.name, "source": c.source, "reason": f"surplus: {n} scenarios were asked for"})
    scenarios = [Scenario(id=slugify(c.name), name=c.name, description=c.description, category=c.category,
                          extra={"source": c.source}) for c in kept[:n]]
    return Selection(scenarios=scenarios, dropped=dropped, candidates=len(pool))
