"""The rlora fine-tuning service: REST API (FastAPI), database models and command line."""
