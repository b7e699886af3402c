-- servetool's wrk script: POST the payload files in turn, count answers by status, and print one
-- JSON line at the end. Arguments: FILE CONTENT_TYPE [FILE CONTENT_TYPE ...]; the Authorization
-- header comes from the environment (SERVETOOL_WRK_AUTH), never the command line, which `ps` shows.
-- The latency at each percentile of SERVETOOL_WRK_PERCENTILES (comma-separated; 0 is the fastest
-- answer, 100 the slowest) goes in the line too, so that several runs can be merged.
local threads = {}
local bodies, types, auth = {}, {}, nil
local next_body = 0
counts = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local from_env = os.getenv("SERVETOOL_WRK_AUTH")
  if from_env and from_env ~= "" then auth = from_env end
  for i = 1, #args, 2 do
    local f = assert(io.open(args[i], "rb"))
    table.insert(bodies, f:read("*all"))
    f:close()
    table.insert(types, args[i + 1])
  end
end

function request()
  next_body = next_body % #bodies + 1
  local headers = { ["Content-Type"] = types[next_body] }
  if auth then headers["Authorization"] = auth end
  return wrk.format("POST", nil, headers, bodies[next_body])
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  local curve = {}
  for p in string.gmatch(os.getenv("SERVETOOL_WRK_PERCENTILES") or "", "[^,]+") do
    local q = tonumber(p)
    local us = q <= 0 and latency.min or (q >= 100 and latency.max or latency:percentile(q))
    table.insert(curve, string.format("%d", us))
  end
  local e = summary.errors
  io.write(string.format(
    'SERVETOOL_WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, ' ..
    '"latency_us": [%s], "statuses": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    table.concat(curve, ", "), table.concat(parts, ", ")))
end
