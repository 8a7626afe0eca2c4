"""gRPC servicer of the Knowledge Service.

RPCs that later work fills in answer UNIMPLEMENTED with reason NOT_IMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from services.common.errors import Unimplemented

Context = grpc.aio.ServicerContext[Any, Any]

KNOWLEDGE_SERVICE = kn.DESCRIPTOR.services_by_name["KnowledgeService"].full_name


class KnowledgeApi(kn_grpc.KnowledgeServiceServicer):
    async def CreateKnowledgeBase(
        self, request: kn.CreateKnowledgeBaseRequest, context: Context
    ) -> kn.CreateKnowledgeBaseResponse:
        raise Unimplemented("CreateKnowledgeBase")

    async def GetKnowledgeBase(
        self, request: kn.GetKnowledgeBaseRequest, context: Context
    ) -> kn.GetKnowledgeBaseResponse:
        raise Unimplemented("GetKnowledgeBase")

    async def ListKnowledgeBases(
        self, request: kn.ListKnowledgeBasesRequest, context: Context
    ) -> kn.ListKnowledgeBasesResponse:
        raise Unimplemented("ListKnowledgeBases")

    async def UpdateKnowledgeBase(
        self, request: kn.UpdateKnowledgeBaseRequest, context: Context
    ) -> kn.UpdateKnowledgeBaseResponse:
        raise Unimplemented("UpdateKnowledgeBase")

    async def DeleteKnowledgeBase(
        self, request: kn.DeleteKnowledgeBaseRequest, context: Context
    ) -> kn.DeleteKnowledgeBaseResponse:
        raise Unimplemented("DeleteKnowledgeBase")

    async def ListDocuments(
        self, request: kn.ListDocumentsRequest, context: Context
    ) -> kn.ListDocumentsResponse:
        raise Unimplemented("ListDocuments")

    async def GetDocument(
        self, request: kn.GetDocumentRequest, context: Context
    ) -> kn.GetDocumentResponse:
        raise Unimplemented("GetDocument")

    async def DeleteDocument(
        self, request: kn.DeleteDocumentRequest, context: Context
    ) -> kn.DeleteDocumentResponse:
        raise Unimplemented("DeleteDocument")

    async def ReindexDocument(
        self, request: kn.ReindexDocumentRequest, context: Context
    ) -> kn.ReindexDocumentResponse:
        raise Unimplemented("ReindexDocument")

    async def ListChunks(
        self, request: kn.ListChunksRequest, context: Context
    ) -> kn.ListChunksResponse:
        raise Unimplemented("ListChunks")

    async def Search(self, request: kn.SearchRequest, context: Context) -> kn.SearchResponse:
        raise Unimplemented("Search")
