"""The registered pyfunc's input shapes, as MLflow's scoring server hands them over (numpy object
arrays inside dicts, DataFrames with list cells); the served round trip is tests/integration/test_serving.py."""

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tasks import adapter_pyfunc as ap

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "yo"}
TOOLS = [{"type": "function", "function": {"name": "f"}}]


def test_plain_strings_keep_working():
    assert ap._requests(["a", "b"]) == ["a", "b"]
    assert ap._requests(np.array(["a", "b"])) == ["a", "b"]
    assert ap._requests("one") == ["one"]
    assert ap._requests(pd.DataFrame({"prompt": ["x"], "other": ["y"]})) == ["x"]
    assert ap._requests(pd.DataFrame({"text": ["z"]})) == ["z"]


def test_chat_shapes():
    one = [([U], None)]
    assert ap._requests({"messages": [U]}) == one  # unified LLM form: plain lists
    assert ap._requests({"messages": np.array([U], dtype=object)}) == one  # `inputs: {messages: ...}`
    assert ap._requests({"messages": np.array([[U], [U]], dtype=object)}) == [([U], None), ([U], None)]
    assert ap._requests({"messages": [U, A, U], "tools": np.array(TOOLS, dtype=object)}) == [([U, A, U], TOOLS)]
    assert ap._requests([{"messages": np.array([U], dtype=object)}, "plain"]) == [([U], None), "plain"]
    frame = pd.DataFrame({"messages": [[U], [U, A, U]], "tools": [TOOLS, float("nan")]})
    assert ap._requests(frame) == [([U], TOOLS), ([U, A, U], None)]


@pytest.mark.parametrize("bad", [{"prompt": "x"}, {"messages": []}, {"messages": [{"content": "no role"}]},
                                 [{"role": "user", "content": "not wrapped"}], {"messages": "text"}])
def test_bad_chat_input_is_a_400(bad):
    with pytest.raises(MlflowException) as err:
        ap._requests(bad)
    assert err.value.get_http_status_code() == 400
