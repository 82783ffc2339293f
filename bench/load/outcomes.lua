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

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")  -- done(): the JSON summary
