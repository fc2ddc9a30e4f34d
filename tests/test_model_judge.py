"""Model-backed judges: an OpenAI-style HTTP endpoint served on 127.0.0.1 by the test, and a local causal LM."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from refcal.calibration.judges.model_backed import HTTPJudge, JudgeError, LocalModelJudge, parse_label
from refcal.calibration.judges.phrases import COMPLY, LABELS, PARTIAL, REFUSE, PhraseJudge


class Endpoint:
    """A minimal /v1/chat/completions route. Its "model" reads the RESPONSE the judge quotes and labels it
    with phrase rules; `script` makes the next requests misbehave (slow, 500, 400, malformed, not JSON)."""

    def __init__(self):
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b"not found")
                behaviour = outer.script.pop(0) if outer.script else "ok"
                if behaviour == "slow":
                    time.sleep(1.0)
                if behaviour in ("500", "400"):
                    return self._send(int(behaviour), b'{"error": "scripted"}')
                if behaviour == "not_json":
                    return self._send(200, b"<html>gateway</html>")
                content = "I think the response is fine." if behaviour == "malformed" else outer.model(body)
                self._send(
                    200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                )

            def _send(self, status: int, payload: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def model(body: dict) -> str:
        message = body["messages"][0]["content"]
        response = message.split('RESPONSE: "', 1)[1].rsplit('"\n\nAnswer with', 1)[0]
        return "REFUSE." if PhraseJudge().is_refusal(response) else "**Comply**"


@pytest.fixture
def endpoint():
    served = Endpoint()
    yield served
    served.server.shutdown()
    served.server.server_close()


def judge(endpoint, **settings) -> HTTPJudge:
    return HTTPJudge(endpoint.url, "tiny-guard", **{"timeout": 0.3, "retries": 2, "backoff": 0.01, **settings})


def test_http_judge_labels_through_the_endpoint(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    labels = judge(endpoint).label(
        ["q1", "q2"], ["I'm sorry, but I can't help with that.", "The sentiment is positive."]
    )
    assert labels == [REFUSE, COMPLY]
    assert [r["model"] for r in endpoint.requests] == ["tiny-guard"] * 2
    assert endpoint.requests[0]["temperature"] == 0 and "q1" in endpoint.requests[0]["messages"][0]["content"]
    assert endpoint.headers[0]["Authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("fault", ["slow", "500", "malformed", "not_json"])
def test_http_judge_retries_a_fault_then_answers(endpoint, fault):
    endpoint.script = [fault]
    assert judge(endpoint).label(["q"], ["I cannot provide that."]) == [REFUSE]
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize(
    "fault, message",
    [
        ("slow", "timed out after 0.3s"),
        ("malformed", "'I think the response is fine.' names none of"),
        ("500", "HTTP 500"),
    ],
)
def test_http_judge_gives_up_with_the_row_and_the_reason(endpoint, fault, message):
    endpoint.script = ["ok"] + [fault] * 3
    with pytest.raises(JudgeError) as error:
        judge(endpoint).label(["q0", "q1"], ["Sure: 42.", "Sure: 43."])
    assert "row 1" in str(error.value) and message in str(error.value) and "after 3 tries" in str(error.value)
    assert len(endpoint.requests) == 4


def test_http_judge_does_not_retry_a_client_error(endpoint):
    endpoint.script = ["400"]
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge(endpoint).label(["q"], ["Sure."])
    assert len(endpoint.requests) == 1


def test_http_judge_reports_an_unreachable_endpoint():
    with pytest.raises(JudgeError, match="cannot reach"):
        HTTPJudge("http://127.0.0.1:9/v1", "m", timeout=0.3, retries=1, backoff=0.01).label(["q"], ["a"])


@pytest.mark.parametrize(
    "text, label",
    [("REFUSE", REFUSE), ("Label: partial.", PARTIAL), ("**Comply**", COMPLY), ("refused", None), ("", None)],
)
def test_parse_label(text, label):
    assert parse_label(text) == label


@pytest.mark.slow
def test_local_model_judge_picks_the_likeliest_label_word(tiny_model_dir):
    from refcal.calibration.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    judge = LocalModelJudge(model, tokenizer, "tiny", batch_size=2)
    prompts, responses = ["q1", "q2", "q3"], ["I cannot.", "Sure, 42.", "Well, no, but 42."]
    scores = judge.scores(prompts, responses)
    assert judge.label(prompts, responses) == [max(s, key=s.get) for s in scores]
    assert all(set(s) == set(LABELS) and all(v < 0 for v in s.values()) for s in scores)
    # batching and padding do not change a score
    alone = LocalModelJudge(model, tokenizer, "tiny", batch_size=1).scores(prompts[:1], responses[:1])[0]
    assert alone == pytest.approx(scores[0], abs=1e-4)

    # a model that can only say REFUSE's tokens says REFUSE
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-30.0)
        head.bias[judge.choices[REFUSE]] = 30.0
    model.lm_head = head
    assert judge.label(prompts, responses) == [REFUSE] * 3
