"""Gateway configs the tests run on."""

from __future__ import annotations


def llm_config(fake_url: str, *, extra_target: str = "", server: str = "default_target: up") -> str:
    """One OpenAI-style target ``up`` at the fake, plus an Anthropic-style ``claude``."""
    return f"""
server: {{{server}}}
targets:
  up:
    base_url: {fake_url}/v1
    provider: openai
    models: ["gpt-*"]
    auth: {{type: bearer_env, env_var: UP_KEY}}
{extra_target}
  claude:
    base_url: {fake_url}
    provider: anthropic
    models: ["claude-*"]
    auth: {{type: header_env, header: x-api-key, env_var: CLAUDE_KEY}}
  rest:
    base_url: {fake_url}/api
    auth: {{type: passthrough}}
"""
