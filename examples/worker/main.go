// Command worker runs baton's discovery for one app as a process of its
// own and prints every change of the app's current server as one JSON line
// on stdout; logs go to stderr. SIGINT or SIGTERM stops it.
//
//	go run ./examples/worker -app orders -servers 127.0.0.1:7700 -etcd 127.0.0.1:2379
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/worker"
)

func main() {
	var (
		etcd     = flag.String("etcd", "", "comma-separated etcd endpoints (optional: without, the worker polls like PowerJob's)")
		servers  = flag.String("servers", "", "comma-separated control addresses of the servers (their -listen/-advertise)")
		protocol = flag.String("protocol", coord.ProtocolHTTP, "transport protocol whose address the worker follows (HTTP, AKKA, ...)")
		app      = flag.String("app", "", "app name")
		interval = flag.Duration("interval", 10*time.Second, "polling interval")
		prefix   = flag.String("prefix", coord.DefaultPrefix, "etcd key prefix")
		lazy     = flag.Bool("lazy", false, "start even if no server can be found yet")
		tlsCA    = flag.String("tls-ca", "", "CA (PEM) that signed the servers' HTTPS certificates (-servers https://HOST:PORT; default: the system's roots)")
		logLevel = flag.String("log-level", "info", "trace, debug, info, warn or error")
	)
	var security coord.EtcdSecurity
	security.Flags(flag.CommandLine)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), `worker follows the baton server that owns one app and prints every change
of it as a JSON line on stdout. -app is required, and so is -servers or
-etcd (or both: etcd to watch the owner, the servers to fall back on).

Usage: worker -app NAME (-servers HOST:PORT,... | -etcd HOST:PORT,...) [flags]

`)
		flag.PrintDefaults()
	}
	flag.Parse()
	if *app == "" || (*servers == "" && *etcd == "") {
		flag.Usage()
		os.Exit(2)
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: *app, Level: hclog.LevelFromString(*logLevel), Output: os.Stderr})
	if err := run(logger, *etcd, security, *tlsCA, *servers, *app, *protocol, *prefix, *interval, *lazy); err != nil {
		logger.Error("worker failed", "error", err)
		os.Exit(1)
	}
}

type line struct {
	Event    string    `json:"event"` // change, isolated
	App      string    `json:"app"`
	Old      string    `json:"old,omitempty"`
	New      string    `json:"new,omitempty"`
	ServerID string    `json:"serverId,omitempty"`
	Token    int64     `json:"token,omitempty"`
	MonoNs   int64     `json:"monoNs"`
	Time     time.Time `json:"time"`
}

func run(logger hclog.Logger, etcd string, security coord.EtcdSecurity, tlsCA, servers, app, protocol, prefix string, interval time.Duration, lazy bool) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	out := json.NewEncoder(os.Stdout)

	cfg := worker.DefaultConfig()
	cfg.AppName, cfg.Prefix, cfg.Interval, cfg.Logger, cfg.AllowLazyConnect = app, prefix, interval, logger, lazy
	cfg.Protocol = protocol
	if tlsCA != "" {
		trust, err := coord.LoadTLS(tlsCA, "", "")
		if err != nil {
			return fmt.Errorf("-tls-ca: %w", err)
		}
		cfg.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: trust}}
	}
	if servers != "" {
		cfg.Servers = strings.Split(servers, ",")
	}
	if etcd != "" {
		// No probe: a worker must start even while etcd is unreachable.
		etcdCfg := coord.ClientConfig(strings.Split(etcd, ","), logger)
		if err := security.Apply(&etcdCfg); err != nil {
			return err
		}
		cli, err := clientv3.New(etcdCfg)
		if err != nil {
			return err
		}
		defer cli.Close()
		cfg.Client = cli
	}
	// OnChange runs on the discovery goroutine, in order: print from it.
	cfg.OnChange = func(old, new worker.Server) {
		_ = out.Encode(line{Event: "change", App: app, Old: old.Address, New: new.Address, ServerID: new.ServerID, Token: new.Token, MonoNs: electiontest.MonoNow(), Time: time.Now()})
	}
	cfg.OnIsolated = func() {
		_ = out.Encode(line{Event: "isolated", App: app, MonoNs: electiontest.MonoNow(), Time: time.Now()})
	}
	d, err := worker.New(cfg)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Start(ctx); err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("signal received, stopping")
	return nil
}
