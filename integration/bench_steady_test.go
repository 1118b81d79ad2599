package integration

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/internal/testutil"
)

// BenchmarkSteadyState: three servers owning 10,000 apps; 1,000 workers
// watching etcd and, in the same window, 1,000 workers in fallback
// (polling with PowerJob's defaults, no etcd); then an idle window
// (BATON_BENCH_IDLE, default 2m). Reports etcd RPCs per second by method
// from etcd's own gRPC metrics — the fallback workers reach only the
// servers, which answer from their tables, so every etcd RPC in the window
// is the servers' or the watching workers' — and HTTP requests per worker
// per minute for each kind of worker. Run with -benchtime=1x.
func BenchmarkSteadyState(b *testing.B) {
	idle := 2 * time.Minute
	if v := os.Getenv("BATON_BENCH_IDLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatal(err)
		}
		idle = d
	}
	const workers = 1000
	for range b.N {
		bc := newBenchCluster(b, 3)
		ids := registerMany(b, bc, 10000)
		electAll(b, bc.nodes, ids)
		every10th := func(i int) string { return fmt.Sprintf("app-%d", i*10) }
		watching, polling := prometheus.NewRegistry(), prometheus.NewRegistry()
		startFleet(b, fleetConfig{N: workers, App: every10th, Etcd: bc.etcd, Servers: bc.addrs(), Registerer: watching})
		startFleet(b, fleetConfig{N: workers, App: every10th, Servers: bc.addrs(), Stagger: true, Registerer: polling})

		const http = "baton_worker_http_requests_total"
		rpc0, w0, p0 := etcdRPCs(b), testutil.Metric(b, watching, http, ""), testutil.Metric(b, polling, http, "")
		time.Sleep(idle) // the idle window being measured
		rpc1, w1, p1 := etcdRPCs(b), testutil.Metric(b, watching, http, ""), testutil.Metric(b, polling, http, "")

		secs := idle.Seconds()
		var total float64
		for method, v := range rpc1 {
			if d := v - rpc0[method]; d > 0 {
				b.ReportMetric(d/secs, method+"/s")
				if method[:4] == "rpc-" {
					total += d
				}
			}
		}
		b.ReportMetric(total/secs, "etcd-rpcs/s")
		b.ReportMetric(total/secs/float64(len(bc.nodes)), "etcd-rpcs/s/node")
		b.ReportMetric((w1-w0)/workers/(secs/60), "http-req/worker/min")
		b.ReportMetric((p1-p0)/workers/(secs/60), "fallback-http-req/worker/min")
	}
}

// etcdRPCs reads etcd's own counters (default registry): RPCs started by
// method ("rpc-Method"), and messages received on streams ("msg-Method";
// unary messages equal unary RPCs and are left out).
func etcdRPCs(b *testing.B) map[string]float64 {
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		kind := map[string]string{"grpc_server_started_total": "rpc", "grpc_server_msg_received_total": "msg"}[f.GetName()]
		if kind == "" {
			continue
		}
		for _, m := range f.GetMetric() {
			var method, typ string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "grpc_method":
					method = l.GetValue()
				case "grpc_type":
					typ = l.GetValue()
				}
			}
			if kind == "msg" && typ == "unary" {
				continue
			}
			out[kind+"-"+method] += m.GetCounter().GetValue()
		}
	}
	return out
}
