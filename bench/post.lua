-- wrk script for bench/run.py: POST the same body, with the same headers, on every request.
-- The body is read once from the file named by BENCH_BODY_FILE (run.py writes one file per size);
-- wrk adds Content-Length itself. BENCH_HEADERS_FILE, when set, names a file of extra request
-- headers, one `name: value` a line (a row's credential: x-api-key or Authorization).
local path = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
local headers_path = os.getenv("BENCH_HEADERS_FILE")
if headers_path and headers_path ~= "" then
  for line in assert(io.open(headers_path, "rb")):lines() do
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then
      wrk.headers[name] = value
    end
  end
end
