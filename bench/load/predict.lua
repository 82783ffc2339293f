-- wrk body script: POST /predict with a random materialised customer and a random amount per request.
-- CUSTOMERS (env) = how many customers exist (ids C000000 .. C<CUSTOMERS-1>), default 2000.
local customers = tonumber(os.getenv("CUSTOMERS") or "2000")
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  math.randomseed(seed * 7919 + os.time())
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  local body = string.format('{"customer_id":"C%06d","transaction_amount":%.2f}',
                             math.random(0, customers - 1), math.random() * 500 + 5)
  return wrk.format(nil, "/predict", nil, body)
end

function done(summary, latency, requests)
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
