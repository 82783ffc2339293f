-- wrk body script: POST /outcomes with ROWS (env, default 256) outcomes per request, the same body each time
-- (the endpoint validates and publishes; the join, not measured here, is what de-duplicates).
local rows = tonumber(os.getenv("ROWS") or "256")
local parts = {}
for i = 1, rows do
  parts[i] = string.format('{"request_id":"bench-%d","label":%d,"outcome_value":%.1f}', i, i % 2, i * 1.5)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"outcomes":[' .. table.concat(parts, ",") .. ']}'

function done(summary, latency, requests)
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
