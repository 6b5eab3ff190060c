-- Send one header whose value changes every request, taken in turn from a file.
--
--   wrk -tN ... -s bench/lua/pick_header.lua URL -- FILE HEADER PREFIX START N
--
-- FILE holds one value per line (e.g. distinct access tokens, or session cookies).
-- Thread t of N sends values START+t, START+t+N, START+t+2N, ... (mod the count), so all
-- threads together walk the list in order and a value comes back only after (nearly)
-- every other value was sent. At the end wrk prints "next-index: I", the first index no
-- thread reached, and the driver passes it as START of the next run. With more values
-- than tokengate's token cache holds, every request misses the cache.
--   bearer-cold:  FILE=tokens.txt  HEADER=Authorization  PREFIX="Bearer "
--   session:      FILE=cookies.txt HEADER=Cookie         PREFIX="tg_session=" (and -H "X-CSRF: 1")

local counter = 0
local threads = {}

function setup(thread)
   thread:set("thread_index", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local values = {}
local requests = {}  -- built once in init(): request() only hands one out
local stride

function init(args)
   local file, start = args[1], tonumber(args[4] or "0")
   local header_name, prefix = args[2], args[3] or ""
   stride = tonumber(args[5] or "1")
   for line in io.lines(file) do
      if #line > 0 then values[#values + 1] = line end
   end
   if #values == 0 then error("no values in " .. file) end
   local headers = {}
   for name, value in pairs(wrk.headers) do headers[name] = value end
   -- Format every request up front (wrk calls init before it starts the clock), so the
   -- load tool spends no more CPU per request than with a fixed request; it shares the
   -- two cores with the proxy under test.
   for i, value in ipairs(values) do
      headers[header_name] = prefix .. value
      requests[i] = wrk.format(nil, nil, headers)
   end
   next_index = start + thread_index  -- a global, so done() can read it per thread
end

function request()
   local formatted = requests[(next_index % #values) + 1]
   next_index = next_index + stride
   return formatted
end

function done(summary, latency, requests)
   local highest = 0
   for _, thread in ipairs(threads) do
      highest = math.max(highest, thread:get("next_index") or 0)
   end
   io.write(string.format("next-index: %d\n", highest))
end
