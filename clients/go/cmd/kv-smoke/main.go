// Command kv-smoke drives a running kv server through the generated Go stubs of kv.v1.KeyValue:
// Status, Put (plain, conditional, raw bytes), Get, List (paginated, one snapshot), Watch (live,
// then resumed with start_revision) and Delete. It prints one line per check and exits 1 at the
// first failure, 2 on bad usage.
//
//	kv-smoke -addr 127.0.0.1:50051 [-prefix smoke/] [-timeout 20s]
//
// tests/polyglot/test_go.py builds it against Debian's Go packages and runs it against a real
// kv-server; see docs/any-language.md.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	kvv1 "github.com/kv/kv/gen/go/kv/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type failure struct{ msg string }

func fail(format string, args ...interface{}) {
	panic(failure{fmt.Sprintf(format, args...)})
}

func check(ok bool, format string, args ...interface{}) {
	if !ok {
		fail(format, args...)
	}
}

func must(err error, what string) {
	if err != nil {
		fail("%s: %v", what, err)
	}
}

var passed int

func pass(format string, args ...interface{}) {
	passed++
	fmt.Printf("ok   %s\n", fmt.Sprintf(format, args...))
}

func main() {
	addr := flag.String("addr", "", "host:port of the kv server (required)")
	prefix := flag.String("prefix", "go-smoke/", "prefix of every key the program writes")
	timeout := flag.Duration("timeout", 20*time.Second, "deadline of the whole run")
	flag.Parse()
	if *addr == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: kv-smoke -addr HOST:PORT [-prefix P] [-timeout D]")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(failure)
			if !ok {
				panic(r)
			}
			fmt.Printf("FAIL %s\n", f.msg)
			fmt.Printf("%d passed, 1 failed\n", passed)
			os.Exit(1)
		}
	}()

	conn, err := grpc.DialContext(ctx, *addr, grpc.WithInsecure(), grpc.WithBlock())
	must(err, "dial "+*addr)
	defer conn.Close()
	run(ctx, kvv1.NewKeyValueClient(conn), *prefix)
	fmt.Printf("%d passed, 0 failed\n", passed)
}

func run(ctx context.Context, kv kvv1.KeyValueClient, prefix string) {
	keyA, keyB, keyC := prefix+"a", prefix+"b", prefix+"c"

	st, err := kv.Status(ctx, &kvv1.StatusRequest{})
	must(err, "Status")
	start := st.GetHeader().GetRevision()
	check(st.GetLimits().GetMaxPageSize() > 0, "Status limits: %v", st.GetLimits())
	pass("Status: revision %d, store %q", start, st.GetStore())

	// Watch from the next revision: the stream is opened before the Put, and start_revision
	// makes the order of the two irrelevant (every event at or after it is delivered).
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	watch, err := kv.Watch(watchCtx, &kvv1.WatchRequest{Key: prefix, Prefix: true, StartRevision: start + 1})
	must(err, "Watch")

	put, err := kv.Put(ctx, &kvv1.PutRequest{Key: keyA, Content: &kvv1.PutRequest_Value{Value: "one"}})
	must(err, "Put a")
	check(put.GetCreated(), "Put a: created = false")
	check(put.GetHeader().GetRevision() == start+1, "Put a: revision %d, want %d", put.GetHeader().GetRevision(), start+1)
	check(put.GetEntry().GetVersion() == 1, "Put a: version %d", put.GetEntry().GetVersion())
	pass("Put %s: created at revision %d", keyA, start+1)

	put, err = kv.Put(ctx, &kvv1.PutRequest{Key: keyA, Content: &kvv1.PutRequest_Value{Value: "two"}, ReturnPrevious: true})
	must(err, "Put a again")
	check(!put.GetCreated(), "Put a again: created = true")
	check(put.GetPrevEntry().GetValue() == "one", "Put a again: prev_entry %v", put.GetPrevEntry())
	check(put.GetEntry().GetVersion() == 2, "Put a again: version %d", put.GetEntry().GetVersion())
	pass("Put %s again: replaced, version 2, previous value returned", keyA)

	_, err = kv.Put(ctx, &kvv1.PutRequest{Key: keyA, Content: &kvv1.PutRequest_Value{Value: "x"}, IfAbsent: true})
	check(status.Code(err) == codes.Aborted, "Put if_absent on an existing key: %v, want ABORTED", err)
	_, err = kv.Put(ctx, &kvv1.PutRequest{Key: keyA, Content: &kvv1.PutRequest_Value{Value: "x"}, IfModRevision: start + 1})
	check(status.Code(err) == codes.Aborted, "Put if_mod_revision stale: %v, want ABORTED", err)
	pass("Put conditions: if_absent and a stale if_mod_revision are ABORTED")

	raw := []byte{0xff, 0x00, 0xfe}
	_, err = kv.Put(ctx, &kvv1.PutRequest{Key: keyB, Content: &kvv1.PutRequest_ValueBytes{ValueBytes: raw}})
	must(err, "Put b")
	last, err := kv.Put(ctx, &kvv1.PutRequest{Key: keyC, Content: &kvv1.PutRequest_Value{Value: "três"}})
	must(err, "Put c")
	end := last.GetHeader().GetRevision()
	check(end == start+4, "revision after 4 puts: %d, want %d", end, start+4)

	got, err := kv.Get(ctx, &kvv1.GetRequest{Key: keyA})
	must(err, "Get a")
	check(got.GetEntry().GetValue() == "two", "Get a: value %q", got.GetEntry().GetValue())
	check(got.GetEntry().GetCreateRevision() == start+1 && got.GetEntry().GetModRevision() == start+2,
		"Get a: revisions %d/%d", got.GetEntry().GetCreateRevision(), got.GetEntry().GetModRevision())
	got, err = kv.Get(ctx, &kvv1.GetRequest{Key: keyB})
	must(err, "Get b")
	check(bytes.Equal(got.GetEntry().GetValueBytes(), raw), "Get b: value_bytes %x", got.GetEntry().GetValueBytes())
	got, err = kv.Get(ctx, &kvv1.GetRequest{Key: keyC})
	must(err, "Get c")
	check(got.GetEntry().GetValue() == "três", "Get c: value %q", got.GetEntry().GetValue())
	_, err = kv.Get(ctx, &kvv1.GetRequest{Key: prefix + "absent"})
	check(status.Code(err) == codes.NotFound, "Get absent: %v, want NOT_FOUND", err)
	pass("Get: text, raw bytes (value_bytes), UTF-8 text, and NOT_FOUND")

	var keys []string
	var snapshot int64
	token := ""
	for page := 0; page < 10; page++ {
		list, err := kv.List(ctx, &kvv1.ListRequest{Prefix: prefix, PageSize: 2, PageToken: token, IncludeCount: true})
		must(err, "List")
		if page == 0 {
			snapshot = list.GetHeader().GetRevision()
			check(list.GetCount() == 3, "List count %d, want 3", list.GetCount())
		}
		check(list.GetHeader().GetRevision() == snapshot, "List page %d at revision %d, first page at %d",
			page, list.GetHeader().GetRevision(), snapshot)
		for _, e := range list.GetEntries() {
			keys = append(keys, e.GetKey())
		}
		token = list.GetNextPageToken()
		if token == "" {
			break
		}
	}
	check(fmt.Sprint(keys) == fmt.Sprint([]string{keyA, keyB, keyC}), "List keys %v", keys)
	check(token == "", "List did not end within 10 pages")
	pass("List: 3 keys in 2 pages of size 2, one snapshot revision %d", snapshot)

	events := collect(watch, 4)
	want := []int64{start + 1, start + 2, start + 3, start + 4}
	for i, ev := range events {
		check(ev.GetType() == kvv1.Event_TYPE_PUT && ev.GetEntry().GetModRevision() == want[i],
			"Watch event %d: %v", i, ev)
	}
	check(events[0].GetEntry().GetKey() == keyA && events[0].GetEntry().GetValue() == "one", "Watch first event %v", events[0])
	stopWatch()
	pass("Watch: the 4 puts arrived live, in revision order")

	del, err := kv.Delete(ctx, &kvv1.DeleteRequest{Key: keyA})
	must(err, "Delete a")
	check(del.GetDeleted() == 1 && del.GetHeader().GetRevision() == start+5, "Delete a: %v", del)
	_, err = kv.Get(ctx, &kvv1.GetRequest{Key: keyA})
	check(status.Code(err) == codes.NotFound, "Get after Delete: %v, want NOT_FOUND", err)
	_, err = kv.Delete(ctx, &kvv1.DeleteRequest{Key: keyA})
	check(status.Code(err) == codes.NotFound, "Delete absent: %v, want NOT_FOUND", err)
	pass("Delete: removed at revision %d; deleting again is NOT_FOUND", start+5)

	// Resume: a new stream from start_revision = start+3 replays that revision and the later
	// ones (the put of b, the put of c, the delete of a), once each, in order.
	resumeCtx, stopResume := context.WithCancel(ctx)
	defer stopResume()
	resumed, err := kv.Watch(resumeCtx, &kvv1.WatchRequest{Key: prefix, Prefix: true, StartRevision: start + 3})
	must(err, "Watch resume")
	events = collect(resumed, 3)
	check(events[0].GetEntry().GetKey() == keyB && events[0].GetEntry().GetModRevision() == start+3, "resumed event 0: %v", events[0])
	check(events[1].GetEntry().GetKey() == keyC && events[1].GetEntry().GetModRevision() == start+4, "resumed event 1: %v", events[1])
	check(events[2].GetType() == kvv1.Event_TYPE_DELETE && events[2].GetEntry().GetKey() == keyA &&
		events[2].GetEntry().GetModRevision() == start+5, "resumed event 2: %v", events[2])
	stopResume()
	pass("Watch resumed from start_revision %d: put b, put c, delete a", start+3)

	del, err = kv.Delete(ctx, &kvv1.DeleteRequest{Key: prefix, Prefix: true})
	must(err, "Delete prefix")
	check(del.GetDeleted() == 2, "Delete prefix: deleted %d, want 2", del.GetDeleted())
	pass("Delete prefix: the 2 remaining keys")
}

// collect reads messages until n events arrived; a cancel message or the end of the stream
// before that is a failure. Progress messages (header only) are skipped.
func collect(stream kvv1.KeyValue_WatchClient, n int) []*kvv1.Event {
	var events []*kvv1.Event
	for len(events) < n {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			fail("Watch ended after %d of %d events", len(events), n)
		}
		must(err, "Watch Recv")
		check(msg.GetCancel() == nil, "Watch cancelled: %v", msg.GetCancel())
		events = append(events, msg.GetEvents()...)
	}
	check(len(events) == n, "Watch delivered %d events, want %d", len(events), n)
	return events
}
