"""Which published estimate the router reads for a request: its class's, or for an explicit
deadline tighter than its class's, the nearest class deadline not looser than it; the model's
(behind everything planned) when nothing fits."""

from __future__ import annotations

from services.router.admission import AdmissionFeedback

CLASSES = {"fast": 2_000, "interactive": 20_000, "batch": 3_600_000}


def feedback(waits: dict[str, float]) -> AdmissionFeedback:
    fb = AdmissionFeedback(store=None, class_deadlines_ms=CLASSES)
    fb._waits = waits  # what refresh() reads from the admission hash
    return fb


def wait(fb, cls, budget):
    a = fb.for_request("m", cls, budget)
    return None if a is None else (a.estimated_wait_ms, a.deadline_at_risk)


def test_a_request_reads_its_class_estimate():
    fb = feedback({"m": 900_000.0, "m|fast": 500.0, "m|interactive": 3_000.0,
                   "m|batch": 900_000.0})
    assert wait(fb, "interactive", 20_000) == (3_000.0, False)
    assert wait(fb, "batch", 3_600_000) == (900_000.0, False)
    assert wait(fb, "batch", 600_000) == (3_000.0, False)  # read at interactive's 20 s
    assert wait(fb, "batch", 10_000) == (500.0, False)  # read at fast's 2 s
    assert wait(fb, "interactive", 2_500) == (500.0, False)  # read at fast's 2 s
    assert wait(fb, "fast", 1_000) == (900_000.0, True)  # tighter than any class: the model's


def test_the_model_estimate_stands_in_when_a_class_has_none():
    fb = feedback({"m": 40_000.0})  # a planner that publishes per model only
    assert wait(fb, "interactive", 20_000) == (40_000.0, True)
    assert fb.for_request("other", "interactive", 20_000) is None
