-- wrk script: requests cycle over KEYS paths (<prefix>0 .. <prefix>KEYS-1), each thread from its
-- own starting point, so a cached route sees a steady mix of hits over a known key set.
-- Usage: wrk ... -s benches/cycle-paths.lua URL -- /prefix/ KEYS
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  prefix = args[1] or "/"
  keys = tonumber(args[2]) or 500
  counter = id * 7919
end

function request()
  counter = counter + 1
  return wrk.format(nil, prefix .. (counter % keys))
end
