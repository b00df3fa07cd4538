-- wrk script for bench/run.py: POST the same body on every request.
-- The body is read once from the file named by BENCH_BODY_FILE (run.py writes one file per size);
-- wrk adds Content-Length itself.
local path = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/octet-stream"
