-- wrk script for POST /api/events: every request is a batch of BATCH CloudEvents with ids
-- never sent before (thread, request and position), about subjects taken in turn from a
-- file of user ids, one `tokens` quantity each; RUN sets this run's ids apart from
-- another's. usage:
--   wrk ... -s scripts/post-events.lua URL -- USERS_FILE SECRET BATCH RUN
local users = {}
local secret, batch, run
local sent = 0
local next_user = 0

-- Each thread's number, as a global of its own Lua state.
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then users[#users + 1] = line end
  end
  if #users == 0 then error("no users in " .. tostring(args[1])) end
  secret = args[2]
  batch = tonumber(args[3] or "1000")
  run = args[4] or "run"
  next_user = math.random(#users)
end

function request()
  sent = sent + 1
  local events = {}
  for i = 1, batch do
    next_user = next_user % #users + 1
    events[i] = string.format(
      '{"specversion":"1.0","id":"%s-%d-%d-%d","source":"bench","type":"tokens","subject":"%s","data":{"quantity":%d}}',
      run, thread_id, sent, i, users[next_user], 100 + i)
  end
  local body = "[" .. table.concat(events, ",") .. "]"
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. secret,
    ["Content-Type"] = "application/cloudevents-batch+json",
  }, body)
end

function response(status, headers, body)
  if status ~= 200 then error("POST /api/events answered " .. status .. ": " .. body) end
end
