"""Loci's public-server load. Each simulated visitor is one session (its own cookie jar) and
remembers exactly which edits it made; when the run stops, it checks that the server's list of
its edits is exactly its own record, and appends the outcome to the JSONL file
$LOCI_LOAD_CHECKS. Every request's time is kept by endpoint and status (answered or refused), in
$LOCI_LOAD_TIMES. Two scenarios (the classes named on locust's command line):

- `Visitor`: each predicts, traces (server-sent events), edits and undoes, 1–3 s apart;
- `Predictor Tracer Editor`: many visitors predicting with 1 s of think time, while one client
  traces and another edits and undoes continuously."""

import json
import os
import random

from locust import HttpUser, between, constant, events, task

PROMPTS = [
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"),
    ("Michael Jordan plays the sport of", "Michael Jordan", "golf"),
    ("The capital of Germany is the city of", "Germany", "Madrid"),
]

MODEL = "SmolLM2-135M-Instruct.Q4_1"

# Predictors ask about the known facts (a different prompt each time, as strangers would): the
# server shares a pass between identical requests, which a handful of prompts would flatter.
KNOWN = os.environ.get("LOCI_LOAD_PROMPTS")
FACTS = [k["prompt"] for k in json.load(open(KNOWN))] if KNOWN and os.path.exists(KNOWN) else \
    [p for p, _, _ in PROMPTS]

# Milliseconds per (endpoint, status): locust's own percentiles mix a refusal's 2 ms with an
# answer's seconds.
TIMES = {}


@events.request.add_listener
def _time(request_type, name, response_time, response_length, response=None, **_):
    status = getattr(response, "status_code", 0)
    TIMES.setdefault(f"{name} {status}", []).append(response_time)


@events.quitting.add_listener
def _save(**_):
    with open(os.environ["LOCI_LOAD_TIMES"], "w") as f:
        json.dump(TIMES, f)


class Checked(HttpUser):
    """A visitor that keeps its own record of its edits and checks the server's at the end."""
    abstract = True

    def on_start(self):
        self.edits = []  # ids of this visitor's edits, oldest first

    def predict(self):
        prompt, _, _ = random.choice(PROMPTS)
        self.client.post("/api/predict", json={"model": MODEL, "prompt": prompt, "top": 5},
                         name="/api/predict")

    def trace(self, kinds, samples):
        prompt, subject, _ = random.choice(PROMPTS)
        body = {"model": MODEL, "prompt": prompt, "subject": subject, "samples": samples,
                "kinds": kinds, "noise": {"type": "fixed", "value": 0.1}}
        # Timed to the stream's end (its result event), not its first byte.
        with self.client.post("/api/trace", json=body, name="/api/trace (SSE)",
                              catch_response=True) as r:
            text = r.text if r.status_code == 200 else ""
            if r.status_code == 200 and "event: result" not in text:
                r.failure("the stream ended without a result: " + text[-200:])

    def edit(self):
        prompt, subject, target = random.choice(PROMPTS)
        body = {"model": MODEL, "prompt": prompt, "subject": subject, "target": target,
                "generate_tokens": 0}
        with self.client.post("/api/edit", json=body, name="/api/edit", catch_response=True) as r:
            if r.status_code == 200:
                self.edits.append(r.json()["id"])
            elif r.status_code in (409, 503):
                r.success()  # a full session or a busy server: refused, and said so

    def undo(self):
        if not self.edits:
            return
        body = {"model": MODEL, "id": self.edits[-1]}
        with self.client.post("/api/undo", json=body, name="/api/undo", catch_response=True) as r:
            if r.status_code == 200:
                self.edits.pop()
            elif r.status_code == 503:
                r.success()

    def on_stop(self):
        r = self.client.get(f"/api/edits?model={MODEL}", name="session check")
        listed = [e["id"] for e in r.json()] if r.status_code == 200 else None
        with open(os.environ["LOCI_LOAD_CHECKS"], "a") as f:
            f.write(json.dumps({"status": r.status_code, "listed": listed, "made": self.edits,
                                "same": listed == self.edits}) + "\n")


class Visitor(Checked):
    wait_time = between(1, 3)

    @task(12)
    def predicts(self):
        self.predict()

    @task(3)
    def traces(self):
        self.trace(["hidden"], 2)

    @task(1)
    def edits_(self):
        self.edit()

    @task(1)
    def undoes(self):
        self.undo()


class Predictor(Checked):
    wait_time = constant(1)

    @task
    def predicts(self):
        self.client.post("/api/predict",
                         json={"model": MODEL, "prompt": random.choice(FACTS), "top": 5},
                         name="/api/predict")


class Tracer(Checked):
    fixed_count = 1
    wait_time = constant(1)

    @task
    def traces(self):
        self.trace(["hidden", "mlp", "attn"], 3)


class Editor(Checked):
    fixed_count = 1
    wait_time = constant(1)

    @task
    def edits_and_undoes(self):
        self.edit()
        self.undo()
