// Command node runs one baton scheduler server as a process of its own.
// Every ownership change is printed on stdout as one JSON line; logs go
// to stderr. SIGINT or SIGTERM drains it (its apps go to their
// successors) and exits.
//
//	go run ./examples/node -etcd 127.0.0.1:2379 -listen 127.0.0.1:7700 -id a -apps orders,billing
//	go run ./examples/node -embedded -apps orders -metrics 127.0.0.1:9100
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/server"
)

func main() {
	var (
		etcd        = flag.String("etcd", "127.0.0.1:2379", "comma-separated etcd endpoints")
		listen      = flag.String("listen", "127.0.0.1:7700", "listen address of baton's endpoints (PowerJob's web port: /server/*, /friend/*)")
		advertise   = flag.String("advertise", "", "control address other servers (and workers, without -external) use (default: from -listen)")
		external    = flag.String("external", "", "control address workers use, when it differs from -advertise (NAT)")
		transports  = flag.String("transport", "", "where the scheduler receives its workers' traffic, per protocol: NAME=ADDR[/EXTERNAL],... such as HTTP=10.0.0.5:10010,AKKA=10.0.0.5:10086 (default: HTTP at the control address)")
		id          = flag.String("id", "", "server id (default: hostname-random)")
		ttl         = flag.Duration("ttl", 5*time.Second, "lease TTL, whole seconds")
		prefix      = flag.String("prefix", coord.DefaultPrefix, "etcd key prefix")
		apps        = flag.String("apps", "", "comma-separated app names to register at start")
		adminToken  = flag.String("admin-token", "", "enable /admin/ with this bearer token")
		logLevel    = flag.String("log-level", "info", "trace, debug, info, warn or error")
		pingTimeout = flag.Duration("ping-timeout", 0, "how long a ping of another server may take (0: the elector's default)")
		embed       = flag.Bool("embedded", false, "run an etcd inside this process instead of dialing -etcd (a demo of one)")
		metrics     = flag.String("metrics", "", "serve Prometheus metrics at http://ADDR/metrics (default: none)")
		balance     = flag.Bool("balance", true, "place apps nobody owns on their preferred live server (false: on the server the worker asked, as PowerJob does)")
		weight      = flag.Float64("weight", 1, "this server's share of apps relative to the others' when balancing")
		settle      = flag.Duration("rebalance-settle", 0, "with -balance: how long the set of servers must stay unchanged before apps move to their preferred servers (0: the default, 10s)")
		rate        = flag.Float64("rebalance-rate", 0, "with -balance: the fraction of its apps a server moves per second when rebalancing (0: the default, 0.02)")
		tlsCert     = flag.String("tls-cert", "", "serve baton's endpoints over HTTPS with this certificate (PEM), with -tls-key")
		tlsKey      = flag.String("tls-key", "", "key of -tls-cert (PEM)")
		tlsCA       = flag.String("tls-ca", "", "CA (PEM) that signed the other servers' -tls-cert, for pinging them (default: the system's roots)")
	)
	var security coord.EtcdSecurity
	security.Flags(flag.CommandLine)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), `node runs one baton scheduler server: it registers in etcd, answers
PowerJob's worker endpoints on -listen (sending workers to the
-transport addresses), and prints every ownership change
as a JSON line on stdout. SIGINT or SIGTERM drains it and exits.

Usage: node [flags]

`)
		flag.PrintDefaults()
	}
	flag.Parse()
	name := *id
	if name == "" {
		name = "node"
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.LevelFromString(*logLevel), Output: os.Stderr})
	if *external != "" && *advertise == "" {
		*advertise = *listen
	}
	protocols, err := parseTransports(*transports)
	if err != nil {
		fmt.Fprintln(os.Stderr, "node: -transport:", err)
		os.Exit(2)
	}
	err = withEtcd(logger, *embed, strings.Split(*etcd, ","), func(endpoints []string) error {
		wire := wireTLS{cert: *tlsCert, key: *tlsKey, ca: *tlsCA, balance: *balance, weight: *weight, settle: *settle, rate: *rate}
		return run(logger, endpoints, security, wire, *metrics, *listen, *advertise, *external, protocols, *id, *ttl, *pingTimeout, *prefix, *apps, *adminToken)
	})
	if err != nil {
		logger.Error("node failed", "error", err)
		os.Exit(1)
	}
}

// withEtcd calls f with the etcd endpoints to dial: those given, or an
// embedded etcd's, stopped (and its data removed) when f returns.
func withEtcd(logger hclog.Logger, embed bool, endpoints []string, f func([]string) error) error {
	if !embed {
		return f(endpoints)
	}
	e, err := embedded.Start(embedded.Config{Logger: logger})
	if err != nil {
		return err
	}
	defer e.Close()
	logger.Info("embedded etcd up", "endpoints", e.Endpoints())
	return f(e.Endpoints())
}

// out prints one JSON line per event; lines never interleave.
var out = json.NewEncoder(os.Stdout)
var outMu sync.Mutex

type event struct {
	Event  string `json:"event"` // started, acquire, end, lose, stopped
	Server string `json:"server"`
	App    int64  `json:"app,omitempty"`
	Token  int64  `json:"token,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Seq numbers this process's acquisitions; an "end" carries the Seq
	// of the "acquire" it ends.
	Seq  int64  `json:"seq,omitempty"`
	Addr string `json:"addr,omitempty"`
	// MonoNs is CLOCK_MONOTONIC, comparable across processes on one
	// machine: for "end" it is the instant the ownership's context was
	// cancelled, taken before anything else happened.
	MonoNs int64     `json:"monoNs"`
	Time   time.Time `json:"time"`
}

func emit(e event) {
	outMu.Lock()
	defer outMu.Unlock()
	_ = out.Encode(e)
}

// parseTransports reads -transport: NAME=ADDR[/EXTERNAL] entries,
// comma-separated.
func parseTransports(s string) (coord.Protocols, error) {
	if s == "" {
		return nil, nil
	}
	out := coord.Protocols{}
	for _, entry := range strings.Split(s, ",") {
		name, addrs, ok := strings.Cut(entry, "=")
		if !ok || name == "" || addrs == "" {
			return nil, fmt.Errorf("%q is not NAME=ADDR[/EXTERNAL]", entry)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("protocol %s is given twice", name)
		}
		addr, ext, _ := strings.Cut(addrs, "/")
		for _, a := range []string{addr, ext} {
			if _, _, err := net.SplitHostPort(a); a != "" && err != nil {
				return nil, fmt.Errorf("%s: %q is not host:port", name, a)
			}
		}
		out[name] = coord.Endpoint{Address: addr, ExternalAddress: ext}
	}
	return out, out.Validate()
}

// wireTLS is the node's HTTPS setup (its certificate and the CA it trusts
// for its peers) and its placement (balance, weight, rebalancing).
type wireTLS struct {
	cert, key, ca string
	balance       bool
	weight        float64
	settle        time.Duration
	rate          float64
}

// apply sets cfg's placement, and its TLS and HTTPClient when a
// certificate is given.
func (w wireTLS) apply(cfg *server.Config) error {
	cfg.Balance, cfg.Weight = w.balance, w.weight
	cfg.Election.RebalanceSettle, cfg.Election.RebalanceRate = w.settle, w.rate
	if w.cert == "" && w.key == "" {
		return nil
	}
	pair, err := tls.LoadX509KeyPair(w.cert, w.key)
	if err != nil {
		return fmt.Errorf("-tls-cert/-tls-key: %w", err)
	}
	cfg.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	trust, err := coord.LoadTLS(w.ca, "", "")
	if err != nil {
		return fmt.Errorf("-tls-ca: %w", err)
	}
	cfg.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: trust}}
	return nil
}

func run(logger hclog.Logger, endpoints []string, security coord.EtcdSecurity, wire wireTLS, metricsAddr, listen, advertise, external string, protocols coord.Protocols, id string, ttl, pingTimeout time.Duration, prefix, apps, adminToken string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	etcdCfg := coord.ClientConfig(endpoints, logger)
	if err := security.Apply(&etcdCfg); err != nil {
		return err
	}
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	cli, err := coord.DialConfig(dialCtx, etcdCfg)
	cancel()
	if err != nil {
		return err
	}
	defer cli.Close()

	cfg := server.DefaultConfig()
	cfg.Client, cfg.Prefix, cfg.ServerID, cfg.TTL, cfg.Listen = cli, prefix, id, ttl, listen
	cfg.AdminToken, cfg.Logger = adminToken, logger
	if err := wire.apply(&cfg); err != nil {
		return err
	}
	if metricsAddr != "" {
		reg := prometheus.NewRegistry()
		cfg.Registerer = reg
		ln, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		defer srv.Close()
		logger.Info("metrics at", "url", "http://"+ln.Addr().String()+"/metrics")
	}
	if pingTimeout > 0 {
		cfg.Election.PingTimeout = pingTimeout
	}
	if advertise != "" {
		cfg.Control = coord.Endpoint{Address: advertise, ExternalAddress: external}
	}
	cfg.Protocols = protocols
	var node *server.Node
	var ends sync.WaitGroup
	var acquisitions atomic.Int64
	cfg.Callbacks = election.Callbacks{
		OnAcquire: func(octx context.Context, app, token int64) {
			// The same token can be acquired again (after the guard
			// resumed) before the end of its previous interval has been
			// printed: the sequence number pairs each end with its acquire.
			seq := acquisitions.Add(1)
			emit(event{Event: "acquire", Server: node.ID(), App: app, Token: token, Seq: seq, MonoNs: electiontest.MonoNow(), Time: time.Now()})
			ends.Go(func() {
				<-octx.Done()
				at, _ := electiontest.EndedAt(octx)
				emit(event{Event: "end", Server: node.ID(), App: app, Token: token, Seq: seq, MonoNs: electiontest.Mono(at), Time: at})
			})
		},
		OnLose: func(app, token int64, why election.Reason) {
			emit(event{Event: "lose", Server: node.ID(), App: app, Token: token, Reason: string(why), MonoNs: electiontest.MonoNow(), Time: time.Now()})
		},
	}
	if node, err = server.NewNode(cfg); err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = node.Start(startCtx)
	cancel()
	if err != nil {
		return err
	}
	for _, name := range strings.Split(apps, ",") {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		app, err := node.Registry().Register(ctx, name)
		if err != nil {
			return fmt.Errorf("register %q: %w", name, err)
		}
		logger.Info("app registered", "app_name", name, "app_id", app.ID)
	}
	emit(event{Event: "started", Server: node.ID(), Addr: node.Addr(), MonoNs: electiontest.MonoNow(), Time: time.Now()})

	<-ctx.Done()
	logger.Info("signal received, draining")
	closeCtx, cancel := context.WithTimeout(context.Background(), 2*ttl+5*time.Second)
	defer cancel()
	err = node.Close(closeCtx)
	ends.Wait()
	emit(event{Event: "stopped", Server: node.ID(), MonoNs: electiontest.MonoNow(), Time: time.Now()})
	return err
}
