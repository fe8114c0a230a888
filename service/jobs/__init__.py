"""The job domain: states and their transitions, a job request to a `TrainConfig`, storage,
and the sending side of the queue. Both the API and the worker use it; it knows no HTTP."""
