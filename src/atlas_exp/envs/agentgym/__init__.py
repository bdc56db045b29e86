"""A client for AgentGym's environment servers, so a model can be evaluated on envs we do not host ourselves.

AgentGym ships each environment as a FastAPI server (`agentenv-webshop`, `agentenv-lmrlgym` for Maze and
Wordle, `agentenv-tool` for Weather/Movie/Todo, `agentenv-textcraft`, `agentenv-babyai`,
`agentenv-sciworld`, `agentenv-sqlgym`); `env.AgentGymHTTPEnv` plays one behind our `Env` protocol. One
concept a module, imports pointing down this list:

- `dialect`: what each server expects and returns, and how its client wrapped the text (the per-env table);
- `transport`: the HTTP calls, retried by urllib3 `Retry` adapters, a `/step` never played twice;
- `records`: AgentTraj-L's `<env>.jsonl`, the source of the long prompts and of the records items are checked on;
- `items`: which server episode is a data item, and the checks that refuse to play another under its name;
- `env`: `AgentGymHTTPEnv`, the `Env` over them.

What was tested is the client against stand-in servers that answer as AgentGym's do in the respects listed
in these modules (tests/test_agentgym_http_env.py, tests/fakes/agentgym.py; several are our in-process envs
behind HTTP), not against AgentGym's own servers, which a user's check (AgentGym 3ef9235, 2025-09) found to
differ from the data in the ways `dialect` and `items` handle.
"""
