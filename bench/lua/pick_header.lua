-- Send one header whose value changes every request, taken in turn from a file.
--
--   wrk -tN ... -s bench/lua/pick_header.lua URL -- FILE HEADER PREFIX START N
--
-- FILE holds one value per line (e.g. distinct access tokens, or session cookies).
-- Thread t of n sends values START+t, START+t+n, START+t+2n, ... (mod the count), so all
-- threads together walk the list in order: a value comes back only after every other
-- value was sent, and START lets the next run continue where this one stopped. With more
-- values than tokengate's token cache holds, every request misses the cache.
--   bearer-cold:  FILE=tokens.txt  HEADER=Authorization  PREFIX="Bearer "
--   session:      FILE=cookies.txt HEADER=Cookie         PREFIX="__Host-tokengate="

local counter = 0

function setup(thread)
   thread:set("thread_index", counter)
   counter = counter + 1
end

local values = {}
local headers = {}
local header_name, prefix
local index, stride

function init(args)
   local file, start = args[1], tonumber(args[4] or "0")
   header_name, prefix = args[2], args[3] or ""
   for line in io.lines(file) do
      if #line > 0 then values[#values + 1] = line end
   end
   if #values == 0 then error("no values in " .. file) end
   for name, value in pairs(wrk.headers) do headers[name] = value end
   stride = tonumber(args[5] or "1")
   index = start + thread_index
end

function request()
   headers[header_name] = prefix .. values[(index % #values) + 1]
   index = index + stride
   return wrk.format(nil, nil, headers)
end
