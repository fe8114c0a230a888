"""Generation in its own process: one `rlora engine` per accelerator, holding the base models,
and API processes forwarding /generate to it.

    local      the in-process InferenceEngine made from the settings (what an engine process
               holds, and what an API process holds in the embedded default)
    protocol   the wire format between them: stream events and typed errors as JSON lines
    server     `rlora engine`: the engine behind a small internal HTTP app
    streaming  the streamed answer of one request, cancelled however it ends (engine and API)
    client     RemoteEngine: the API's side, routing each request by base model
"""
