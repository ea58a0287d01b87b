-- wrk script: each connection waits DELAY ms between requests, a paced load of about
-- connections x 1000 / DELAY requests per second (0: as fast as it can). With a HEADER, each
-- request carries one of COUNT values, spread so that a value comes back rarely (many
-- rate-limit buckets, each seen rarely).
-- Usage: wrk ... -s benches/paced.lua URL -- DELAY_MS [HEADER COUNT]
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  pause = tonumber(args[1]) or 0
  header = args[2]
  count = tonumber(args[3]) or 100000
  n = id * 1000003
end

function delay()
  return pause
end

function request()
  if header == nil then
    return wrk.format()
  end
  n = n + 7919
  return wrk.format(nil, nil, { [header] = tostring(n % count) })
end
