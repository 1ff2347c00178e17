"""The `lfm2` command, driven as a user would: a pseudo-terminal for chat, subprocesses for errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm2", *args], capture_output=True, text=True, input=stdin,
                          timeout=120)


def test_generate_streams_and_reports_speed(chat_checkpoint):
    r = run("generate", "--model", str(chat_checkpoint), "--temperature", "0", "--max-new-tokens", "8",
            "--verbose", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "8 generated" in r.stderr


def test_generate_reads_stdin(chat_checkpoint):
    r = run("generate", "-m", str(chat_checkpoint), "--temperature", "0", "--max-new-tokens", "4", stdin="Hello")
    assert r.returncode == 0 and r.stdout.strip()


@pytest.mark.parametrize(
    "args, words",
    [
        (["generate", "--model", "/does/not/exist", "hi"], ["/does/not/exist", "no such checkpoint"]),
        (["generate", "--model", "X", "--temperature", "hot", "hi"], ["--temperature", "invalid float"]),
        (["generate", "--model", "X", "--bogus", "hi"], ["unrecognized arguments: --bogus"]),
        (["chat", "--max-new-tokens", "many"], ["--max-new-tokens", "invalid int"]),
    ],
)
def test_bad_invocations_print_one_line(args, words):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lfm2: error:"), r.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize("flag, value, words", [("--dtype", "float8", "unknown dtype 'float8'"),
                                                ("--device", "gpu7", "unknown device 'gpu7'"),
                                                ("--device", "tpu", "unknown device 'tpu'")])
def test_bad_dtype_or_device_is_one_line(chat_checkpoint, flag, value, words):
    r = run("generate", "--model", str(chat_checkpoint), flag, value, "hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and words in r.stderr


def test_bad_sampling_value_is_one_line(chat_checkpoint):
    r = run("generate", "--model", str(chat_checkpoint), "--top-p", "3", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "top_p=3.0" in r.stderr


def test_chat_two_turns_in_a_terminal(chat_checkpoint):
    child = pexpect.spawn(sys.executable, ["-m", "lfm2", "chat", "--model", str(chat_checkpoint), "--temperature",
                                           "0", "--max-new-tokens", "6", "--verbose"], encoding="utf-8", timeout=60)
    child.expect("/exit")
    child.expect("> ")
    child.sendline("Hello there")
    child.expect(r"\[(\d+) prompt tokens")
    first_prompt = int(child.match.group(1))
    child.expect("> ")
    child.sendline("And again")
    child.expect(r"\[(\d+) prompt tokens")
    second_prompt = int(child.match.group(1))
    assert second_prompt > first_prompt + 6  # the history (both turns) is in the second prompt
    child.expect("> ")
    child.sendline("/reset")
    child.expect(r"conversation reset")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}


def test_chat_with_tools_asks_for_each_result(tmp_path):
    """The bundled model calls the offered tool; the result typed in goes back as a tool turn and the
    model answers from it (with `--strict-tools` too); the history keeps the whole exchange."""
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    child = pexpect.spawn(sys.executable, ["-m", "lfm2", "chat", "--tools", str(tools), "--strict-tools",
                                           "--temperature", "0", "--max-new-tokens", "40", "--verbose"],
                          encoding="utf-8", timeout=60)
    child.expect("Tools offered: get_weather")
    child.expect("> ")
    child.sendline("Is it raining in Lima?")
    child.expect(r'\[tool call\] get_weather\(\{"city": "Lima"\}\)')
    child.expect(r"\[result of get_weather\]> ")
    child.sendline('{"temperature": 18, "condition": "rainy"}')
    child.expect(r"\[\d+ prompt tokens")  # the statistics follow the answer
    assert "rainy" in child.before and "18" in child.before, child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_prints_tool_calls(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(WEATHER))  # one object: a list of one
    out = run("generate", "--chat", "--tools", str(tools), "--temperature", "0", "What's the weather in Paris?")
    assert out.returncode == 0 and out.stdout.strip() == '[tool call] get_weather({"city": "Paris"})'


def test_strict_tools_without_tools_is_one_line():
    out = run("chat", "--strict-tools")
    assert out.returncode == 2 and out.stderr.strip() == (
        "lfm2: error: --strict-tools needs --tools FILE (the schemas the calls are kept to)"), out.stderr


@pytest.mark.parametrize("content, words", [
    ('[{"x": 1}]', "tool 0: tool has no 'name'"), ("[", "not JSON (Expecting value at line 1, column 2"),
    ("[]", "expected a JSON list of tool schemas"), (None, "cannot read it"),
])
def test_bad_tools_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    out = run("chat", "--tools", str(path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr


def test_chat_ctrl_c_at_a_tool_result_cancels_the_request_only(tmp_path):
    """Ctrl-C at a tool's result prompt drops that request and its call from the conversation and goes
    back to the prompt; the chat goes on (it used to end)."""
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    # A run started in the background (`cmd &`) ignores SIGINT, and so would the chat: restore it.
    child = pexpect.spawn(sys.executable, ["-m", "lfm2", "chat", "--tools", str(tools), "--strict-tools",
                                           "--temperature", "0", "--max-new-tokens", "40", "--verbose"],
                          encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("> ")
    child.sendline("Is it raining in Lima?")
    child.expect(r"\[(\d+) prompt tokens")
    first_prompt = int(child.match.group(1))
    child.expect(r"\[result of get_weather\]> ")
    child.sendintr()
    child.expect(r"\[cancelled: the request and its tool calls are left out of the conversation\]")
    child.expect("> ")
    child.sendline("Is it raining in Lima?")
    child.expect(r"\[(\d+) prompt tokens")
    assert int(child.match.group(1)) == first_prompt  # the same prompt again: nothing of the first try is left
    child.expect(r"\[result of get_weather\]> ")
    child.sendline('{"temperature": 18, "condition": "rainy"}')
    child.expect(r"\[\d+ prompt tokens")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_unavailable_device_is_one_line(chat_checkpoint):
    # On a machine without the device, one line that says so and what to use instead; never a traceback.
    import torch

    for device, available in [("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())]:
        if available:
            continue
        r = run("generate", "--model", str(chat_checkpoint), "--device", device, "--chat", "Hi")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert r.stderr.startswith(f"lfm2: error: device '{device}'") and "--device cpu" in r.stderr


def test_version_and_help_are_quick_and_import_no_torch():
    from pathlib import Path

    import tomllib

    import lfm2

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert lfm2.__version__ == project["version"]
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lfm2 {lfm2.__version__}"
    # Parsing `--help` must not import torch (seconds): checked in a fresh interpreter.
    probe = ("import sys; from lfm2.cli import main\n"
             "for argv in (['--help'], ['generate', '--help'], ['chat', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("False"), r.stdout + r.stderr
    assert "COMMAND" in r.stdout and "serve" in r.stdout and "(default: cpu)" in r.stdout
    assert "(default: 512)" in r.stdout  # --max-new-tokens shows its default


def test_lfm2_exports_resolve():
    import lfm2

    for name in lfm2.__all__:
        assert getattr(lfm2, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lfm2.nope  # noqa: B018


def test_ctrl_c_during_generate_ends_the_line(chat_checkpoint):
    """Ctrl-C while tokens stream: exit 130, and the output ends with a newline so the shell's prompt
    starts on its own line (it was left after the last token)."""
    child = pexpect.spawn(sys.executable, ["-m", "lfm2", "generate", "--model", str(chat_checkpoint),
                                           "--temperature", "0", "--ignore-eos", "--max-new-tokens", "100000",
                                           "Hello"],
                          encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(r"\S")  # tokens are streaming
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 or child.signalstatus == signal.SIGINT
    assert child.before.endswith(("\n", "\r\n")), repr(child.before[-40:])


def test_generate_and_chat_take_quantize(chat_checkpoint, monkeypatch, capsys):
    """`--quantize int8|int4` on generate (and chat, which shares the model options) reaches `lfm2.load`."""
    import lfm2
    from lfm2.cli import main
    from lfm2.quant import QuantLinear

    loaded = []
    real_load = lfm2.load
    monkeypatch.setattr(lfm2, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    main(["generate", "--model", str(chat_checkpoint), "--quantize", "int4", "--temperature", "0",
          "--max-new-tokens", "4", "Hello"])
    assert capsys.readouterr().out.strip()
    assert any(isinstance(m, QuantLinear) for m in loaded[0].model.modules())
    r = run("chat", "--quantize", "int2")
    assert r.returncode == 2 and "--quantize" in r.stderr and "invalid choice" in r.stderr
