"""The HTTP API: the FastAPI app, its dependencies, errors, auth, paging, uploads, the TGI wire
format and the routes per resource."""
