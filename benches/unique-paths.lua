-- wrk script: every request goes to a path never used before (<prefix><thread>-<n>), so no cache
-- hit and no request coalescing can make a route look faster than it is.
-- Usage: wrk ... -s benches/unique-paths.lua URL -- /prefix/
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  prefix = args[1] or "/"
  counter = 0
end

function request()
  counter = counter + 1
  return wrk.format(nil, prefix .. id .. "-" .. counter)
end
