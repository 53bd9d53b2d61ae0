"""langchain-tests' standard unit suite for `ChatErnie`.

langchain-tests installs pytest plugins that load in every pytest run (pytest-socket, pytest-benchmark, syrupy,
...), so this suite runs in its own invocation, with sockets disabled to show that ChatErnie needs no network:

    pip install langchain-tests
    pytest tests/langchain_standard --disable-socket --allow-unix-socket
"""

from __future__ import annotations

import pytest
from conftest import make_hf_model, save_hf

pytest.importorskip("langchain_tests")
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from ernie45.langchain import ChatErnie  # noqa: E402


class TestChatErnieUnit(ChatModelUnitTests):
    path: str = ""

    @pytest.fixture(scope="class", autouse=True)
    def checkpoint(self, tmp_path_factory, tokenizer_dir):
        type(self).path = save_hf(
            make_hf_model("dense", vocab_size=400),
            tmp_path_factory.mktemp("std") / "tiny-chat",
            tokenizer_dir,
        )

    @property
    def chat_model_class(self) -> type[ChatErnie]:
        return ChatErnie

    @property
    def chat_model_params(self) -> dict:
        return {"model": self.path, "dtype": "float32", "device": "cpu"}
