// Command embed is the README's "Embed it" program: a baton server
// mounted in a scheduler's own HTTP server, and a worker that follows the
// server owning its app. It runs on an embedded etcd unless -etcd names a
// cluster.
//
//	go run ./examples/embed
//	go run ./examples/embed -etcd 10.0.0.5:2379,10.0.0.6:2379,10.0.0.7:2379
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

func main() {
	endpoints := flag.String("etcd", "", "comma-separated etcd endpoints (default: an embedded etcd)")
	flag.Parse()
	if err := run(*endpoints); err != nil {
		fmt.Fprintln(os.Stderr, "embed:", err)
		os.Exit(1)
	}
}

func run(endpoints string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logger := hclog.New(&hclog.LoggerOptions{Name: "embed", Level: hclog.Warn})
	var eps []string
	if endpoints == "" {
		etcd, err := embedded.Start(embedded.Config{Logger: logger})
		if err != nil {
			return err
		}
		defer etcd.Close()
		eps = etcd.Endpoints()
	} else {
		eps = strings.Split(endpoints, ",")
	}
	// One client per process, with keepalives that notice a dead
	// connection (coord.ClientConfig; add TLS and credentials there).
	cli, err := coord.Dial(ctx, eps, logger)
	if err != nil {
		return err
	}
	defer cli.Close()

	// --- the scheduler: its own listener and mux, with baton mounted ---
	ln, err := net.Listen("tcp", "127.0.0.1:0") // before Start: peers ping it
	if err != nil {
		return err
	}
	acquired := make(chan string, 1)
	cfg := server.DefaultConfig()
	cfg.Client, cfg.Logger = cli, logger
	cfg.Control = coord.Endpoint{Address: ln.Addr().String()}
	cfg.Callbacks.OnAcquire = func(ctx context.Context, app, token int64) {
		acquired <- fmt.Sprintf("scheduling app %d (token %d)", app, token)
		// start the app's jobs here, in goroutines that stop with ctx
	}
	cfg.Callbacks.OnLose = func(app, token int64, why election.Reason) {}
	node, err := server.NewNode(cfg)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/server/", node.Handler()) // PowerJob's worker endpoints
	mux.Handle("/friend/", node.Handler()) // server-to-server pings
	mux.Handle("/admin/", node.Handler())  // only with cfg.AdminToken
	go http.Serve(ln, mux)
	if err := node.Start(ctx); err != nil {
		return err
	}
	defer node.Close(context.Background())
	if _, err := node.Registry().Register(ctx, "orders"); err != nil {
		return err
	}

	// --- a worker of app "orders", in its own process in real life ---
	wcfg := worker.DefaultConfig()
	wcfg.AppName, wcfg.Client = "orders", cli
	wcfg.OnChange = func(old, new worker.Server) { fmt.Printf("worker: server is now %s\n", new.Address) }
	w, err := worker.New(wcfg)
	if err != nil {
		return err
	}
	defer w.Close()
	if err := w.Start(ctx); err != nil { // its acquire makes a server own the app
		return err
	}
	fmt.Println("server:", <-acquired)
	return nil
}
