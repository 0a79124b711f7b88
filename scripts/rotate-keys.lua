-- wrk script: every request carries the next API key of a file (one key per line), so the
-- load comes from many customers, as production's does. Each wrk thread starts at its own
-- offset. usage: wrk ... -s scripts/rotate-keys.lua URL -- KEYS_FILE
local keys = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then keys[#keys + 1] = line end
  end
  if #keys == 0 then error("no keys in " .. tostring(args[1])) end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
  i = math.random(#keys)
end

-- Headers given with -H (wrk.headers) go with every request too.
function request()
  i = i % #keys + 1
  local headers = { ["X-API-Key"] = keys[i] }
  for name, value in pairs(wrk.headers) do headers[name] = value end
  return wrk.format(nil, nil, headers)
end
