"""The parts of the auth filter: who a caller is (JWT, API key), what a route needs, how often it may
call (rate limits in Redis), and what it did (events on NATS). The filter itself is
`meshkit.extproc.filters.auth`; these modules know nothing about Envoy or the chain."""
