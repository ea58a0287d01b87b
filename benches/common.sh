# Shared by benches/bench.sh and benches/callgrind.sh (sourced).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# nginx_http WORK UPSTREAM_PORT LISTEN_PORT KEEPALIVE: the http block both benchmarks give nginx,
# the same routes as sidecache's: / (pass-through), /cached/ (proxy_cache), /limited/ (limit_req
# allowing every request).
nginx_http() {
  cat <<NGINX
http {
  access_log off;
  keepalive_requests 1000000;
  proxy_cache_path $1/nginx-cache levels=1:2 keys_zone=bench:10m max_size=100m inactive=60m use_temp_path=off;
  upstream backend { server 127.0.0.1:$2; keepalive $4; }
  limit_req_zone \$binary_remote_addr zone=bench_rl:10m rate=100000000r/s;
  server {
    listen 127.0.0.1:$3;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    location / { proxy_pass http://backend; }
    location /cached/ { proxy_pass http://backend; proxy_cache bench; proxy_cache_valid 200 60s; }
    location /limited/ { proxy_pass http://backend; limit_req zone=bench_rl burst=100000000 nodelay; }
  }
}
NGINX
}
