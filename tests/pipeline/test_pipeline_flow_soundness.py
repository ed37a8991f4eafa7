"""Planted verifiers in copies of the demo recordings, through the generate flow on a real
Prefect server: each is told why and regenerated, and a task whose verifier stays lenient or
too strict is dropped with a reason naming the wrong (or equivalent) episode; the other tasks
publish."""
from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.slow


def _fenced(body: str) -> str:
    return f"```python\n{body.strip()}\n```"


# recipe_box task 3: "Add my Thai Green Curry recipe to my meal plan for dinner on 2026-12-02, for
# 4 servings." Looks at the one new row, its recipe and date, never at its meal type or servings.
VALUE_LENIENT = _fenced('''
def verify(initial_db, final_db, final_answer):
    ch = db_changes(initial_db, final_db)
    recipe = initial_db.execute("SELECT id FROM recipes WHERE title = 'Thai Green Curry'").fetchone()[0]
    new = ch.get("meal_plan_entries", {}).get("inserted", [])
    ok = (set(ch) == {"meal_plan_entries"} and len(new) == 1 and new[0]["recipe_id"] == recipe
          and new[0]["plan_date"] == "2026-12-02")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"new": new}}
''')

# team_expenses task 0 (a total spent): wants the amount written exactly as "$1,227.25".
OVER_STRICT = _fenced('''
def verify(initial_db, final_db, final_answer):
    cents = initial_db.execute(
        """SELECT COALESCE(SUM(i.usd_amount_cents), 0) FROM expense_items i
           JOIN expense_reports r ON r.id = i.report_id JOIN teams t ON t.id = r.team_id
           JOIN expense_categories c ON c.id = i.category_id
           WHERE t.name = 'Platform Engineering' AND c.name = 'Lodging'
             AND r.status IN ('approved', 'reimbursed')
             AND i.expense_date BETWEEN '2026-10-01' AND '2026-10-31'""").fetchone()[0]
    text = f"${cents / 100:,.2f}"
    ok = text in (final_answer or "")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"expected": text}}
''')

# "Nothing else changed" read as "no row was deleted", the way 8 of 16 real-model verifiers
# compared it: an inserted or edited row anywhere passes.
NOTHING_DELETED = '''
def _nothing_deleted(initial_db, final_db):
    tables = [r[0] for r in initial_db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    return all({r[0] for r in initial_db.execute(f'SELECT rowid FROM "{t}"')}
               <= {r[0] for r in final_db.execute(f'SELECT rowid FROM "{t}"')} for t in tables)

'''

# clinic_booking task 6 (a 5-star review), with that comparison.
DELETIONS_ONLY = _fenced(NOTHING_DELETED + '''
def verify(initial_db, final_db, final_answer):
    appt = initial_db.execute(
        "SELECT a.id FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id "
        "WHERE p.last_name = 'Brooks' AND a.start_time LIKE '2026-11-12%' AND a.status = 'completed'").fetchone()[0]
    reviews = final_db.execute("SELECT rating, comment FROM reviews WHERE appointment_id = ?", (appt,)).fetchall()
    reviewed = any(r[0] == 5 and (r[1] or "").strip().lower() == "very thorough and kind." for r in reviews)
    kept = _nothing_deleted(initial_db, final_db)
    ok = reviewed and kept
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"reviewed": reviewed, "nothing_deleted": kept}}
''')


# clinic_booking task 1 (cancel an appointment, with a reason), the same way.
CANCEL_DELETIONS_ONLY = _fenced(NOTHING_DELETED + '''
def verify(initial_db, final_db, final_answer):
    appt = initial_db.execute(
        "SELECT a.id FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id "
        "WHERE p.last_name = 'Brooks' AND a.start_time LIKE '2026-12-02T09:30%' AND a.status = 'booked'").fetchone()[0]
    row = final_db.execute("SELECT status, cancellation_reason FROM appointments WHERE id = ?", (appt,)).fetchone()
    cancelled = row[0] == "cancelled" and (row[1] or "").strip().lower() == "schedule conflict at work"
    kept = _nothing_deleted(initial_db, final_db)
    return {"verdict": "complete" if cancelled and kept else "incomplete", "evidence": {"row": list(row)}}
''')


def _plant(fixtures, scenario: str, stage: str, replies: list[str | None]) -> None:
    """Replace a recording's attempts: a string is a planted reply, None the recorded good one."""
    path = fixtures / scenario / f"{stage}.json"
    data = json.loads(path.read_text())
    good = data["attempts"][-1]
    data["attempts"] = [good if r is None else dict(good, content=r, completion_tokens=len(r) * 2 // 7)
                        for r in replies]
    path.write_text(json.dumps(data))


def test_planted_lenient_and_over_strict_verifiers_are_regenerated_then_dropped_naming_why(
        prefect_server, awm_home, tmp_path, monkeypatch):
    from awm_core.settings import DEFAULT_FIXTURES, get_settings
    from flows.generate import run_generate
    from storage.catalog import Catalog

    fixtures = tmp_path / "fixtures"
    for sid in ("recipe_box", "team_expenses", "clinic_booking"):
        shutil.copytree(DEFAULT_FIXTURES / sid, fixtures / sid)
    _plant(fixtures, "recipe_box", "verifier.3", [VALUE_LENIENT])  # lenient at every attempt
    _plant(fixtures, "team_expenses", "verifier.0", [OVER_STRICT])  # too strict at every attempt
    _plant(fixtures, "clinic_booking", "verifier.6", [DELETIONS_ONLY])
    # Lenient at first, then the recorded good one: regenerated with the evidence and kept.
    _plant(fixtures, "clinic_booking", "verifier.1", [CANCEL_DELETIONS_ONLY, None])
    monkeypatch.setenv("AWM_GENERATION__STAGE_RETRIES", "1")
    get_settings.cache_clear()
    summary = run_generate(scenarios=["recipe_box", "team_expenses", "clinic_booking"], concurrency=1,
                           fixtures_dir=str(fixtures))
    assert sorted(summary["published"]) == ["clinic_booking", "recipe_box", "team_expenses"], summary["dropped"]
    dropped = summary["dropped_tasks"]
    assert {sid: sorted(d) for sid, d in dropped.items()} == {"recipe_box": [3], "team_expenses": [0],
                                                                "clinic_booking": [6]}, dropped
    value = dropped["recipe_box"][3]
    assert value.startswith('verifier_mutation: the verifier said "complete" after change_value'), value
    assert ': meal_type "dinner" -> ' in value and "(another enum member; the task states meal_type)" in value, value
    strict = dropped["team_expenses"][0]
    assert strict.startswith("verifier_equivalence: the verifier said \"incomplete\" after reworded_answer"), strict
    deletions = dropped["clinic_booking"][6]
    assert deletions.startswith(("verifier_mutation: the verifier said \"complete\" after extra_insert",
                                 "verifier_mutation: the verifier said \"complete\" after extra_update")), deletions
    soundness = summary["verifier_soundness"]
    assert soundness["recipe_box"]["lenient_dropped"] == 1 and soundness["recipe_box"]["lenient_regenerated"] == 1
    assert soundness["team_expenses"]["too_strict_dropped"] == 1
    assert soundness["team_expenses"]["too_strict_regenerated"] == 1
    assert soundness["clinic_booking"]["lenient_regenerated"] == 2 and soundness["clinic_booking"]["lenient_dropped"] == 1
    with Catalog.open(get_settings(), read_only=True) as cat:
        envs = {sid: cat.get_environment(sid) for sid in summary["published"]}
    assert {sid: len(e.tasks) for sid, e in envs.items()} == {"recipe_box": 9, "team_expenses": 9, "clinic_booking": 9}
    # Both values the planted verifier ignores are named in the report, each by its own check.
    fooled = [c.detail for c in envs["recipe_box"].validation.checks
              if c.task_idx == 3 and c.name == "verifier_mutation" and not c.passed]
    assert any(": meal_type " in d for d in fooled) and any(": servings 4 -> 5 " in d for d in fooled), fooled
    # The repaired verifier of clinic task 1 is the recorded good one, and passed every check.
    kept = [c for c in envs["clinic_booking"].validation.checks if c.task_idx == 1
            and c.name in ("verifier_mutation", "verifier_equivalence")]
    assert kept and all(c.passed for c in kept)
