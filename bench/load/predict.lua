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

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")  -- done(): the JSON summary
