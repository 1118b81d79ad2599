// Command scheduler shows baton embedded in an existing Go scheduler: for
// each app it owns, a node runs a small cron-like loop, started in
// OnAcquire and stopped by its context, and every write the loop makes to
// etcd is fenced with the ownership's token. When the app moves to another
// server, a write that the old owner still attempts — a stale timer, a
// paused goroutine — is rejected by etcd.
//
// Each scheduler also has its own transport listener, where its workers
// send their traffic (PowerJob's heartbeats): baton answers a worker's
// /server/acquire with the owner's transport address, not with the address
// of baton's endpoints. A worker replayed here, as a PowerJob worker
// speaking the HTTP protocol, finds its heartbeats received by whichever
// scheduler owns its app.
//
//	go run ./examples/scheduler
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/server"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "scheduler:", err)
		os.Exit(1)
	}
}

const prefix = "/baton-scheduler"

// cron is the scheduler's own per-app loop: every tick it records a run in
// etcd, fenced, so that only the current owner's runs are ever recorded.
func cron(ctx context.Context, node *server.Node, cli *clientv3.Client, app int64) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			fmt.Printf("  %s: cron loop of app %d stopped (%v)\n", node.ID(), app, context.Cause(ctx))
			return
		case <-tick.C:
		}
		fence, err := node.Elector().Fence(app)
		if err != nil {
			continue // not owner (any more): the ctx is about to end
		}
		run := fmt.Sprintf("%s run %d at %s", node.ID(), n, time.Now().Format("15:04:05.000"))
		resp, err := cli.Txn(ctx).If(fence).Then(clientv3.OpPut(fmt.Sprintf("%s/runs/%d", prefix, app), run)).Commit()
		if err == nil && resp.Succeeded && n%5 == 0 {
			fmt.Printf("  %s: recorded %q\n", node.ID(), run)
		}
	}
}

func run() error {
	etcd, err := embedded.Start(embedded.Config{})
	if err != nil {
		return err
	}
	defer etcd.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	cli := etcd.Client()

	start := func(id string) (*server.Node, error) {
		transport, err := listenTransport(id)
		if err != nil {
			return nil, err
		}
		cfg := server.DefaultConfig()
		cfg.Client, cfg.Prefix, cfg.ServerID, cfg.Listen, cfg.TTL = cli, prefix, id, "127.0.0.1:0", 2*time.Second
		cfg.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: transport}}
		var node *server.Node
		cfg.Callbacks = election.Callbacks{
			OnAcquire: func(ctx context.Context, app, token int64) {
				fmt.Printf("  %s: owns app %d with token %d, starting its cron loop\n", id, app, token)
				go cron(ctx, node, cli, app) // stops when the ownership ends
			},
			OnLose: func(app, token int64, why election.Reason) {
				fmt.Printf("  %s: lost app %d (token %d): %s\n", id, app, token, why)
			},
		}
		node, err = server.NewNode(cfg)
		if err != nil {
			return nil, err
		}
		return node, node.Start(ctx)
	}
	a, err := start("sched-a")
	if err != nil {
		return err
	}
	defer a.Close(context.Background())
	b, err := start("sched-b")
	if err != nil {
		return err
	}
	defer b.Close(context.Background())

	app, err := a.Registry().Register(ctx, "nightly-report")
	if err != nil {
		return err
	}
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		return err
	}
	fmt.Println("sched-a elected; its loop runs for a while")
	// A PowerJob worker of the app asks sched-b (first in its list) where
	// to go, then sends its heartbeat there.
	if err := workerTick(b.Addr(), app.ID); err != nil {
		return err
	}
	time.Sleep(700 * time.Millisecond)

	// Keep a's fence as a stale goroutine would, then move the app.
	staleFence, err := a.Elector().Fence(app.ID)
	if err != nil {
		return err
	}
	fmt.Println("handing the app over to sched-b")
	if _, err := a.Elector().HandOver(ctx, app.ID); err != nil {
		return err
	}
	time.Sleep(700 * time.Millisecond)

	if err := workerTick(b.Addr(), app.ID); err != nil {
		return err
	}
	fmt.Println("sched-a, deposed, tries one more write with its old fence:")
	resp, err := cli.Txn(ctx).If(staleFence).Then(clientv3.OpPut(fmt.Sprintf("%s/runs/%d", prefix, app.ID), "stale write from sched-a")).Commit()
	if err != nil {
		return err
	}
	last, err := cli.Get(ctx, fmt.Sprintf("%s/runs/%d", prefix, app.ID))
	if err != nil || len(last.Kvs) == 0 {
		return fmt.Errorf("no run recorded: %v", err)
	}
	fmt.Printf("  write accepted: %v; last recorded run: %q\n", resp.Succeeded, last.Kvs[0].Value)
	if resp.Succeeded {
		return fmt.Errorf("a deposed owner's fenced write was accepted")
	}
	return nil
}

// listenTransport starts the scheduler's own transport listener, which
// receives its workers' heartbeats (PowerJob's HTTP protocol: POST
// /server/workerHeartbeat with a JSON body), and returns its address.
func listenTransport(id string) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /server/workerHeartbeat", func(w http.ResponseWriter, r *http.Request) {
		var hb struct {
			WorkerAddress string `json:"workerAddress"`
			AppID         int64  `json:"appId"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&hb); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Printf("  %s: heartbeat from worker %s of app %d on its transport %s\n", id, hb.WorkerAddress, hb.AppID, ln.Addr())
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"success":true}`)
	})
	go http.Serve(ln, mux) // lives as long as the example
	return ln.Addr().String(), nil
}

// workerTick is what a PowerJob worker of app does every 10 s: ask a
// server (the control address in its list) where the app's server is,
// then send its heartbeat to the address it was given.
func workerTick(server string, app int64) error {
	resp, err := http.Get(fmt.Sprintf("http://%s/server/acquire?protocol=HTTP&appId=%d", server, app))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var answer struct {
		Success bool   `json:"success"`
		Data    string `json:"data"`
		Message string `json:"message"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil || !answer.Success {
		return fmt.Errorf("acquire: %v %s", err, answer.Message)
	}
	fmt.Printf("  worker: acquire at %s says the server is %s\n", server, answer.Data)
	body := fmt.Sprintf(`{"workerAddress":"127.0.0.1:27777","appId":%d,"heartbeatTime":%d}`, app, time.Now().UnixMilli())
	hb, err := http.Post("http://"+answer.Data+"/server/workerHeartbeat", "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	hb.Body.Close()
	if hb.StatusCode != http.StatusOK {
		return fmt.Errorf("heartbeat to %s: %s", answer.Data, hb.Status)
	}
	return nil
}
